"""/metrics of every process we start, scraped over HTTP before and after real requests; and the Grafana
dashboard, whose every query must name a metric these processes expose."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from dynamo_grpc import metrics
from dynamo_grpc.client import RouterClient
from tests import scrape
from tests.etcd_server import EtcdServer
from tests.processes import REPO, RoleProcess, free_port

pytestmark = pytest.mark.slow

MODEL = "sim-tiny"
ENGINE_FLAGS = ("--engine", "simulated", "--decode-step-s", "0.002", "--model", MODEL)
AUTOSCALING_FLAGS = ("--autoscale-prefill-rps", "5", "--autoscale-decode-rps", "5", "--autoscale-max-prefill",
                     "1", "--autoscale-max-decode", "1", "--slo-ttft-ms", "1000", "--slo-itl-ms", "100")
DASHBOARD = REPO / "docs" / "grafana-dashboard.json"
GRPC_ROLES = ("control-plane", "prefill", "decode", "router")
COMPLETIONS, COMPLETION_TOKENS, CHAT_TOKENS, ROUTER_REQUESTS, ROUTER_TOKENS = 3, 5, 4, 2, 6


@dataclass
class Scrapes:
    """Each process's /metrics before and after the traffic."""

    before: dict[str, str]
    after: dict[str, str]

    def delta(self, process: str, name: str, **labels: str) -> float:
        return _total(self.after[process], name, labels) - _total(self.before[process], name, labels)

    def now(self, process: str, name: str, **labels: str) -> float:
        return _total(self.after[process], name, labels)


def _total(text: str, name: str, labels: dict[str, str]) -> float:
    """The sum of `name`'s series that carry `labels` (others may differ: worker ids)."""
    wanted = set(labels.items())
    return sum(value for (sample, have), value in scrape.samples(text).items()
               if sample == name and wanted <= have)


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrapes]:
    """A fleet of processes (etcd, control plane with autoscaling, prefill, decode, router, HTTP frontend),
    scraped, then sent requests over HTTP and gRPC, then scraped again."""
    logs = tmp_path_factory.mktemp("metrics-fleet")
    etcd = EtcdServer(logs / "etcd")
    etcd.start()
    common = ("--etcd", etcd.endpoint, "--lease-ttl-s", "2", "--namespace", "metrics")
    metrics_ports = {role: free_port() for role in GRPC_ROLES}
    extra = {"control-plane": AUTOSCALING_FLAGS, "prefill": ENGINE_FLAGS, "decode": ENGINE_FLAGS,
             "router": ()}
    procs = {role: RoleProcess(role, *common, "--metrics-port", str(metrics_ports[role]), *extra[role],
                               log_dir=logs) for role in GRPC_ROLES}
    procs["frontend"] = RoleProcess("frontend", *common, log_dir=logs)
    urls = {role: f"http://127.0.0.1:{port}/metrics" for role, port in metrics_ports.items()}
    urls["frontend"] = f"http://127.0.0.1:{procs['frontend'].port}/metrics"
    try:
        asyncio.run(_until_disaggregated(procs))
        with httpx.Client() as http:
            before = {role: http.get(url).text for role, url in urls.items()}
            asyncio.run(_traffic(procs))
            after = {role: http.get(url).text for role, url in urls.items()}
        yield Scrapes(before, after)
    finally:
        for proc in procs.values():
            proc.stop()
        etcd.stop()


async def _until_disaggregated(procs: dict[str, RoleProcess]) -> None:
    """Wait until the router and the frontend's router both send requests through the prefill worker."""
    await asyncio.gather(*(procs[role].wait_serving(timeout_s=60) for role in GRPC_ROLES))
    frontend = f"http://127.0.0.1:{procs['frontend'].port}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60  # generous: the two cores are often busy with other work
    async with RouterClient(procs["router"].endpoint) as client, httpx.AsyncClient(base_url=frontend) as http:
        while True:
            result = await client.generate("warm up", model=MODEL, max_tokens=2).collect()
            try:
                reply = (await http.post("/v1/completions", json={"model": MODEL, "prompt": "warm up",
                                                                  "max_tokens": 2})).json()
            except httpx.TransportError:
                reply = {}
            moved = reply.get("usage", {}).get("prompt_tokens_details", {}).get("kv_transferred_tokens", 0)
            if result.completion.kv_transfer.bytes and moved:
                return
            assert loop.time() < deadline, procs["frontend"].log()
            await asyncio.sleep(0.2)


async def _traffic(procs: dict[str, RoleProcess]) -> None:
    frontend = f"http://127.0.0.1:{procs['frontend'].port}"
    async with httpx.AsyncClient(base_url=frontend) as http:
        for i in range(COMPLETIONS):
            body = {"model": MODEL, "prompt": f"metrics {i}", "max_tokens": COMPLETION_TOKENS, "ignore_eos": True}
            reply = await http.post("/v1/completions", json=body)
            assert reply.status_code == 200, reply.text
        async with http.stream("POST", "/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "stream me"}], "stream": True,
                "max_tokens": CHAT_TOKENS, "ignore_eos": True}) as stream:
            assert stream.status_code == 200 and "[DONE]" in (await stream.aread()).decode()
        refused = await http.post("/v1/completions", json={"model": "no-such-model", "prompt": "x"})
        assert refused.status_code == 404
    async with RouterClient(procs["router"].endpoint) as client:
        for i in range(ROUTER_REQUESTS):
            stream = client.generate(f"over grpc {i}", model=MODEL, max_tokens=ROUTER_TOKENS, ignore_eos=True)
            await stream.collect()


def test_frontend_metrics_move(scrapes: Scrapes) -> None:
    model = {"model": MODEL}
    generated = COMPLETIONS * COMPLETION_TOKENS + CHAT_TOKENS
    assert scrapes.delta("frontend", "dynamo_frontend_requests_total", endpoint="/v1/completions",
                         status="200") == COMPLETIONS
    assert scrapes.delta("frontend", "dynamo_frontend_requests_total", endpoint="/v1/chat/completions",
                         status="200") == 1
    assert scrapes.delta("frontend", "dynamo_frontend_requests_total", endpoint="/v1/completions",
                         status="404") == 1
    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                      "request_duration_seconds", "input_sequence_tokens"):
        assert scrapes.delta("frontend", f"dynamo_frontend_{histogram}_count", **model) == COMPLETIONS + 1
    assert scrapes.delta("frontend", "dynamo_frontend_output_sequence_tokens_sum", **model) == generated
    assert scrapes.delta("frontend", "dynamo_frontend_time_to_first_token_seconds_sum", **model) > 0
    assert scrapes.now("frontend", "dynamo_frontend_inflight_requests") == 0
    # The router inside the frontend's process.
    assert scrapes.delta("frontend", "dynamo_router_requests_total", outcome="length") == COMPLETIONS + 1
    assert scrapes.delta("frontend", "dynamo_router_requests_total", outcome="model_not_found") == 1
    assert scrapes.delta("frontend", "dynamo_router_prefills_total", where="remote") == COMPLETIONS + 1
    assert scrapes.now("frontend", "dynamo_router_pairs") == 1


def test_router_metrics_move(scrapes: Scrapes) -> None:
    assert scrapes.delta("router", "dynamo_router_requests_total", outcome="length") == ROUTER_REQUESTS
    assert scrapes.delta("router", "dynamo_router_prefills_total", where="remote") == ROUTER_REQUESTS
    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                      "request_duration_seconds"):
        assert scrapes.delta("router", f"dynamo_router_{histogram}_count") == ROUTER_REQUESTS
    assert scrapes.now("router", "dynamo_router_inflight_requests") == 0
    assert scrapes.now("router", "dynamo_router_migrations_total") == 0
    assert scrapes.now("router", "dynamo_router_workers", role="prefill") == 1
    assert scrapes.now("router", "dynamo_router_workers", role="decode") == 1
    assert scrapes.now("router", "dynamo_router_pairs") == 1


def test_worker_metrics_move(scrapes: Scrapes) -> None:
    requests = COMPLETIONS + 1 + ROUTER_REQUESTS
    generated = COMPLETIONS * COMPLETION_TOKENS + CHAT_TOKENS + ROUTER_REQUESTS * ROUTER_TOKENS
    prefill, decode = {"role": "prefill"}, {"role": "decode"}
    assert scrapes.delta("prefill", "dynamo_component_requests_total", outcome="ok", **prefill) == requests
    assert scrapes.delta("prefill", "dynamo_component_time_to_first_token_seconds_count",
                         **prefill) == requests
    assert scrapes.delta("prefill", "dynamo_component_prefix_cache_queries_total", **prefill) > 0
    assert scrapes.delta("prefill", "dynamo_kv_transfers_completed_total", **prefill) == requests
    assert scrapes.now("prefill", "dynamo_kv_held_transfers", **prefill) == 0
    assert scrapes.delta("decode", "dynamo_component_requests_total", outcome="length", **decode) == requests
    assert scrapes.delta("decode", "dynamo_component_inter_token_latency_seconds_count", **decode) == requests
    assert scrapes.delta("decode", "dynamo_component_generation_tokens_total", **decode) == generated
    assert scrapes.now("decode", "dynamo_component_engine_active_requests", **decode) == 0
    assert scrapes.now("decode", "dynamo_component_kvstats_total_blocks", **decode) > 0
    # Simulated prefill workers hold KV in memory, not in a segment, and these prompts' KV is too small to
    # be offered over NIXL: every prompt's KV was pulled over gRPC, named in the series, with no fallback.
    assert scrapes.delta("decode", "dynamo_kv_transfer_seconds_count", transport="grpc") == requests
    assert scrapes.delta("decode", "dynamo_kv_transfer_bytes_total", transport="grpc") >= requests * 4096
    assert scrapes.now("decode", "dynamo_kv_transport_fallbacks_total") == 0
    assert scrapes.now("decode", "dynamo_component_inflight_requests", **decode) == 0


def test_control_plane_metrics(scrapes: Scrapes) -> None:
    assert scrapes.now("control-plane", "dynamo_control_plane_workers", role="prefill") == 1
    assert scrapes.now("control-plane", "dynamo_control_plane_workers", role="decode") == 1
    assert scrapes.now("control-plane", "dynamo_control_plane_pairs") == 1
    assert scrapes.now("control-plane", "dynamo_control_plane_pairing_changes_total") >= 1
    assert scrapes.now("control-plane", "dynamo_control_plane_scale_target_version") >= 1
    assert scrapes.now("control-plane", "dynamo_control_plane_scale_target_workers", pool="decode") >= 0
    assert "dynamo_control_plane_scale_target_workers" in scrape.names(scrapes.after["control-plane"])


async def test_sampled_series_of_two_parts_in_one_process_add_up() -> None:
    """Two routers in one process (as in `serve` plus a frontend of its own) give one series, not two."""
    stops = [metrics.sample(key, lambda n=n: [("dynamo_router_pairs", {}, float(n))]) for key, n in
             (("first", 1), ("second", 2))]
    exposed = metrics.exposition().decode()
    assert [line for line in exposed.splitlines() if line.startswith("dynamo_router_pairs")] == [
        "dynamo_router_pairs 3.0"]
    for stop in stops:
        await stop()
    assert "dynamo_router_pairs" not in metrics.exposition().decode()


# PromQL words that are not metric names: aggregations' modifiers, operators, and label names in `by (...)`.
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                 "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords, label
    names (in `{...}` and `by (...)`) or ranges."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        word, rest = match.group(0), expr[match.end():].lstrip()
        if word not in _PROMQL_WORDS and not rest.startswith("("):
            names.add(word)
    return names


def test_metric_names_are_read_out_of_promql() -> None:
    quantile = 'histogram_quantile(0.9, sum by (le, role) (rate(a_bucket{role="x"}[5m])))'
    assert metric_names(quantile) == {"a_bucket"}
    ratio = "sum(rate(b_total[$__rate_interval])) / sum without (pool) (c) > bool 0"
    assert metric_names(ratio) == {"b_total", "c"}


def test_dashboard_queries_name_metrics_we_export(scrapes: Scrapes) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = set().union(*(scrape.names(text) for text in scrapes.after.values()))
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(queries) >= 15
    for query in queries:
        names = metric_names(query)
        assert names, f"no metric in {query!r}"
        assert names <= exported, f"{query!r} reads {sorted(names - exported)}, which no process exports"
    # Every metric family we define is on the dashboard, so nothing we export goes unseen.
    family = re.compile(r"_(bucket|sum|count|total)$")
    shown = {family.sub("", name) for query in queries for name in metric_names(query)}
    ours = {family.sub("", name) for name in exported if name.startswith("dynamo_")}
    assert ours <= shown, f"not on the dashboard: {sorted(ours - shown)}"


def test_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = json.loads(Path(DASHBOARD).read_text())
    assert dashboard["title"] and dashboard["schemaVersion"] >= 30 and dashboard["uid"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"type", "title", "gridPos"} <= panel.keys()
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
