"""Prometheus metrics of every process, served at /metrics (README: Observability).

One registry per process, prometheus_client's default (so a vLLM worker's own `vllm:` metrics come along).
Each part creates its metrics when it first starts in the process, so a process exposes only the parts it
runs. What happens per request is observed once per request (histograms, counters by outcome); what a part
already keeps (engine load, prefix-cache totals, pairing table, scale target) is read when a scrape comes,
so it costs nothing between scrapes. Names follow Dynamo's (`dynamo_frontend_*`, `dynamo_component_*`) and
vLLM's meanings where they say the same thing.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from dynamo_grpc.errors import DynamoError
from dynamo_grpc.v1 import common_pb2 as pb

disable_created_metrics()  # a `_created` series beside every counter and histogram doubles what scrapes carry

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)
KV_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
ROLE_LABELS = {pb.WORKER_ROLE_PREFILL: "prefill", pb.WORKER_ROLE_DECODE: "decode",
               pb.WORKER_ROLE_ROUTER: "router"}
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def outcome_of(error: BaseException | None, finished: str = "ok") -> str:
    """A request's outcome label: how it finished, the reason it failed for, or `cancelled`."""
    if error is None:
        return finished
    if isinstance(error, DynamoError):
        return error.reason.lower()
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"
    return "internal"


_FINISHED = {reason: pb.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()
             for reason in pb.FinishReason.values()}


def finish_label(reason: int) -> str:
    """A finish reason's outcome label: stop, length, cancelled."""
    return _FINISHED.get(reason, "ok")


class RequestTimer:
    """In flight while inside `with`; on leaving, counts the request by outcome and observes its duration.
    Code inside sets `outcome` when it finishes well (default `ok`)."""

    __slots__ = ("_requests", "_labels", "_inflight", "_duration", "_started", "outcome")

    def __init__(self, requests: Counter, labels: tuple[str, ...], inflight: Any, duration: Any) -> None:
        self._requests, self._labels, self._inflight, self._duration = requests, labels, inflight, duration
        self.outcome = "ok"

    def __enter__(self) -> RequestTimer:
        self._started = time.perf_counter()
        self._inflight.inc()
        return self

    @property
    def started(self) -> float:
        return self._started

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        self._inflight.dec()
        self._requests.labels(*self._labels, outcome_of(error, self.outcome)).inc()
        self._duration.observe(time.perf_counter() - self._started)


# --- what each part observes per request ------------------------------------------------------------


@dataclass(frozen=True)
class ModelSeries:
    """A model's series of the frontend's histograms."""

    ttft: Any
    itl: Any
    duration: Any
    input_tokens: Any
    output_tokens: Any


@dataclass(frozen=True)
class FrontendMetrics:
    """The OpenAI HTTP frontend (Dynamo's frontend metrics)."""

    requests: Counter
    inflight: Gauge
    ttft: Histogram
    itl: Histogram
    duration: Histogram
    input_tokens: Histogram
    output_tokens: Histogram
    _models: dict[str, ModelSeries] = field(default_factory=dict)

    def of_model(self, model: str) -> ModelSeries:
        """The model's series, looked up once per model (a label lookup takes a lock)."""
        series = self._models.get(model)
        if series is None:
            series = self._models[model] = ModelSeries(*(family.labels(model) for family in (
                self.ttft, self.itl, self.duration, self.input_tokens, self.output_tokens)))
        return series


@functools.cache
def frontend() -> FrontendMetrics:
    return FrontendMetrics(
        requests=Counter("dynamo_frontend_requests", "HTTP requests by endpoint and status code.",
                         ["endpoint", "status"]),
        inflight=Gauge("dynamo_frontend_inflight_requests", "Generation requests being served now."),
        ttft=Histogram("dynamo_frontend_time_to_first_token_seconds", "From request to its first token.",
                       ["model"], buckets=LATENCY_BUCKETS_S),
        itl=Histogram("dynamo_frontend_inter_token_latency_seconds",
                      "Each finished request's mean gap between tokens (one observation per request).",
                      ["model"], buckets=ITL_BUCKETS_S),
        duration=Histogram("dynamo_frontend_request_duration_seconds", "From request to its last token.",
                           ["model"], buckets=DURATION_BUCKETS_S),
        input_tokens=Histogram("dynamo_frontend_input_sequence_tokens", "Prompt tokens per finished request.",
                               ["model"], buckets=TOKEN_BUCKETS),
        output_tokens=Histogram("dynamo_frontend_output_sequence_tokens",
                                "Generated tokens per finished request.", ["model"], buckets=TOKEN_BUCKETS))


@dataclass(frozen=True)
class RouterMetrics:
    """The router: RouterService, or the router inside an HTTP frontend."""

    requests: Counter
    inflight: Gauge
    ttft: Histogram
    itl: Histogram
    duration: Histogram
    migrations: Counter
    prefills: Counter

    def request(self) -> RequestTimer:
        return RequestTimer(self.requests, (), self.inflight, self.duration)


@functools.cache
def router() -> RouterMetrics:
    return RouterMetrics(
        requests=Counter("dynamo_router_requests", "Requests by outcome: stop, length, cancelled, or the "
                         "error reason in lower case.", ["outcome"]),
        inflight=Gauge("dynamo_router_inflight_requests", "Requests being routed or relayed now."),
        ttft=Histogram("dynamo_router_time_to_first_token_seconds", "From request to its first token.",
                       buckets=LATENCY_BUCKETS_S),
        itl=Histogram("dynamo_router_inter_token_latency_seconds",
                      "Each finished request's mean gap between tokens (one observation per request).",
                      buckets=ITL_BUCKETS_S),
        duration=Histogram("dynamo_router_request_duration_seconds", "From request to its end.",
                           buckets=DURATION_BUCKETS_S),
        migrations=Counter("dynamo_router_migrations", "Requests resumed on another decode worker after "
                           "theirs was lost mid-stream."),
        prefills=Counter("dynamo_router_prefills", "Where prompts were computed: remote (a prefill worker), "
                         "local (the decode worker, by the disaggregation policy), fallback (the decode "
                         "worker, the prefill worker being unreachable).", ["where"]))


@dataclass(frozen=True)
class WorkerMetrics:
    """One prefill or decode worker's requests (Dynamo's component metrics)."""

    role: str
    worker_id: str
    requests: Counter
    inflight: Any
    duration: Any
    ttft: Any
    itl: Any
    generated: Any

    def request(self) -> RequestTimer:
        return RequestTimer(self.requests, (self.role, self.worker_id), self.inflight, self.duration)


@functools.cache
def _worker_families() -> tuple[Counter, Gauge, Histogram, Histogram, Histogram, Counter]:
    labels = ["role", "worker_id"]
    return (
        Counter("dynamo_component_requests", "Prefill or Decode calls by outcome: ok (prefill), stop, "
                "length, cancelled, or the error reason in lower case.", [*labels, "outcome"]),
        Gauge("dynamo_component_inflight_requests", "Prefill or Decode calls being served now.", labels),
        Histogram("dynamo_component_request_duration_seconds", "From call to its last message.", labels,
                  buckets=DURATION_BUCKETS_S),
        Histogram("dynamo_component_time_to_first_token_seconds", "At this worker: arrival to KV ready "
                  "(prefill), arrival to first token, KV pull included (decode).", labels,
                  buckets=LATENCY_BUCKETS_S),
        Histogram("dynamo_component_inter_token_latency_seconds", "Each finished request's mean gap between "
                  "tokens (decode; one observation per request).", labels, buckets=ITL_BUCKETS_S),
        Counter("dynamo_component_generation_tokens", "Tokens generated (vLLM's generation_tokens).", labels))


def worker(role: str, worker_id: str) -> WorkerMetrics:
    """The worker's metrics, its label values bound once (ITL and tokens generated: decode workers only)."""
    requests, inflight, duration, ttft, itl, generated = _worker_families()
    labels = (role, worker_id)
    decode = role == "decode"
    return WorkerMetrics(role, worker_id, requests, inflight.labels(*labels), duration.labels(*labels),
                         ttft.labels(*labels), itl.labels(*labels) if decode else None,
                         generated.labels(*labels) if decode else None)


@dataclass(frozen=True)
class KvTransferMetrics:
    """KV a decode worker received, by transport (`shm`, `nixl`, `grpc`), and the transports that failed."""

    bytes: Counter
    seconds: Histogram
    fallbacks: Counter

    def observe(self, transport: str, size: int, seconds: float) -> None:
        self.bytes.labels(transport).inc(size)
        self.seconds.labels(transport).observe(seconds)


@functools.cache
def kv_transfer() -> KvTransferMetrics:
    return KvTransferMetrics(
        bytes=Counter("dynamo_kv_transfer_bytes", "KV bytes received from prefill workers.", ["transport"]),
        seconds=Histogram("dynamo_kv_transfer_seconds", "Time to take one request's KV: link the segment "
                          "(shm), READ it (nixl) or pull and check it (grpc), and release it.",
                          ["transport"], buckets=KV_SECONDS_BUCKETS),
        fallbacks=Counter("dynamo_kv_transport_fallbacks", "KV transports that failed mid-transfer or could "
                          "not reach the bytes, handing over to the next, by the one that failed.",
                          ["transport"]))


@functools.cache
def pairing_changes() -> Counter:
    return Counter("dynamo_control_plane_pairing_changes", "Pairing tables published (each a change).")


# --- what is read when a scrape comes -----------------------------------------------------------------

Sample = tuple[str, dict[str, str], float]
"""A series of a sampled metric: its name (as in SAMPLED), labels and value."""

SAMPLED: dict[str, tuple[str, str]] = {
    # Workers: their engine's load and caches (vLLM's num_requests_*, kv_cache_usage_perc, prefix_cache_*).
    "dynamo_component_engine_active_requests": ("gauge", "Requests running or queued in the engine "
                                                "(its queue depth)."),
    "dynamo_component_kvstats_active_blocks": ("gauge", "KV blocks in use by requests."),
    "dynamo_component_kvstats_total_blocks": ("gauge", "KV blocks in the engine."),
    "dynamo_component_kvstats_gpu_cache_usage_percent": ("gauge", "Share of KV blocks in use, 0..1."),
    "dynamo_component_kvstats_gpu_prefix_cache_hit_rate": ("gauge", "Share of prompt tokens found in the "
                                                           "prefix cache since start, 0..1."),
    "dynamo_component_prefix_cache_queries": ("counter", "Prompt tokens prefilled here, cached or not."),
    "dynamo_component_prefix_cache_hits": ("counter", "Of those, tokens found in the prefix cache."),
    "dynamo_component_requests_finished": ("counter", "Requests the engine finished."),
    # Prefill workers: KV held for decode workers.
    "dynamo_kv_held_transfers": ("gauge", "KV transfers held for decode workers to take."),
    "dynamo_kv_held_bytes": ("gauge", "KV bytes held for decode workers to take."),
    "dynamo_kv_transfers_completed": ("counter", "Held KV transfers taken and released."),
    "dynamo_kv_transfers_expired": ("counter", "Held KV transfers freed by their lease expiring."),
    # Routers: the fleet they see.
    "dynamo_router_workers": ("gauge", "Workers the router sees, by role."),
    "dynamo_router_pairs": ("gauge", "Prefill-to-decode pairs the router may use."),
    # The control plane: the fleet, its pairing table and scale target.
    "dynamo_control_plane_workers": ("gauge", "Registered workers, by role."),
    "dynamo_control_plane_pairs": ("gauge", "Pairs in the published pairing table."),
    "dynamo_control_plane_pairing_version": ("gauge", "Version of the published pairing table."),
    "dynamo_control_plane_scale_target_workers": ("gauge", "Workers the scale target asks for, by pool."),
    "dynamo_control_plane_scale_target_version": ("gauge", "Version of the published scale target."),
}


class _Sampled:
    """Reads every registered source at scrape time; sources come and go with the parts that own them.
    Series two sources give alike (two routers in one process) add up: a scrape never has duplicates."""

    def __init__(self) -> None:
        self._sources: dict[object, Callable[[], Iterable[Sample]]] = {}

    def add(self, key: object, source: Callable[[], Iterable[Sample]]) -> None:
        self._sources[key] = source

    def remove(self, key: object) -> None:
        self._sources.pop(key, None)

    def describe(self) -> list[Metric]:
        return []  # families exist only while a source gives them samples

    def collect(self) -> Iterator[Metric]:
        series: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for source in list(self._sources.values()):
            for name, labels, value in source():
                values = series.setdefault(name, {})
                key = tuple(labels.items())
                values[key] = values.get(key, 0.0) + value
        for name, values in series.items():
            kind, documentation = SAMPLED[name]
            maker = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = maker(name, documentation, labels=[label for label, _ in next(iter(values))])
            for key, value in values.items():
                family.add_metric([v for _, v in key], value)
            yield family


@functools.cache
def _sampled() -> _Sampled:
    collector = _Sampled()
    REGISTRY.register(collector)  # type: ignore[arg-type]
    return collector


def sample(key: object, source: Callable[[], Iterable[Sample]]) -> Callable[[], Awaitable[None]]:
    """Read `source` at every scrape until the returned cleanup runs (a role's cleanups are async)."""
    _sampled().add(key, source)

    async def stop() -> None:
        _sampled().remove(key)

    return stop


def workers_by_role(name: str, workers: Iterable[Any]) -> list[Sample]:
    """`name` per worker role (`prefill`, `decode`) of these `WorkerInfo`s."""
    roles = collections.Counter(ROLE_LABELS.get(worker.role, "other") for worker in workers)
    return [(name, {"role": role}, float(count)) for role, count in sorted(roles.items())]


def worker_samples(role: str, worker_id: str, stats: Callable[[], Any]) -> Callable[[], Iterable[Sample]]:
    """A worker's engine and KV store, from its `WorkerStats`."""
    labels = {"role": role, "worker_id": worker_id}

    def read() -> Iterable[Sample]:
        s = stats()
        samples = [("dynamo_component_engine_active_requests", labels, s.active_requests),
                   ("dynamo_component_kvstats_active_blocks", labels, s.used_kv_blocks),
                   ("dynamo_component_kvstats_total_blocks", labels, s.total_kv_blocks),
                   ("dynamo_component_kvstats_gpu_cache_usage_percent", labels,
                    s.used_kv_blocks / s.total_kv_blocks if s.total_kv_blocks else 0.0),
                   ("dynamo_component_kvstats_gpu_prefix_cache_hit_rate", labels,
                    s.prefix_cache_hit_tokens / s.prompt_tokens if s.prompt_tokens else 0.0),
                   ("dynamo_component_prefix_cache_queries", labels, s.prompt_tokens),
                   ("dynamo_component_prefix_cache_hits", labels, s.prefix_cache_hit_tokens),
                   ("dynamo_component_requests_finished", labels, s.requests_finished)]
        if role == "prefill":
            samples += [("dynamo_kv_held_transfers", labels, s.held_transfers),
                        ("dynamo_kv_held_bytes", labels, s.held_kv_bytes),
                        ("dynamo_kv_transfers_completed", labels, s.transfers_completed),
                        ("dynamo_kv_transfers_expired", labels, s.transfers_expired)]
        return samples

    return read


# --- serving /metrics ----------------------------------------------------------------------------------


def exposition() -> bytes:
    """Every metric of this process in Prometheus' text format."""
    return generate_latest(REGISTRY)


@dataclass
class _Group:
    """The processes sharing this one's port (`--workers`): their private /metrics, by index."""

    urls: list[str]
    own: int


_group: _Group | None = None


async def group_exposition(group: _Group) -> bytes:
    """The series of every process of the group, each labelled with its `process` index; a process that
    does not answer within 2 s is left out of this scrape."""
    async def series_of(index: int, url: str) -> str:
        if index == group.own:
            return exposition().decode()
        async with session.get(url) as reply:
            return await reply.text()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        texts = await asyncio.gather(*(series_of(i, url) for i, url in enumerate(group.urls)),
                                     return_exceptions=True)
    families: dict[str, Metric] = {}
    for index, text in enumerate(texts):
        if isinstance(text, BaseException):
            continue
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
            merged.samples += [sample._replace(labels={**sample.labels, "process": str(index)})
                               for sample in family.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected(list(families.values())))
    return generate_latest(registry)


class _Collected:
    """Metrics gathered already, as a collector a registry can render."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> list[Metric]:
        return self.metrics


async def metrics_handler(request: web.Request) -> web.Response:
    body = exposition() if _group is None else await group_exposition(_group)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def own_metrics_handler(request: web.Request) -> web.Response:
    return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE})


async def join_group(ports: list[int], own: int) -> MetricsServer:
    """Serve this process's own series on its private loopback port, and from now on answer /metrics for
    the whole group, so a scrape of the shared port sees every process whichever one it reaches."""
    global _group
    server = await serve_metrics("127.0.0.1", ports[own], handler=own_metrics_handler)
    _group = _Group([f"http://127.0.0.1:{port}/metrics" for port in ports], own)
    return server


@dataclass
class MetricsServer:
    runner: web.AppRunner
    url: str

    async def stop(self) -> None:
        await self.runner.cleanup()


async def serve_metrics(host: str, port: int, *, reuse_port: bool = False,
                        handler: Callable[[web.Request], Awaitable[web.Response]] = metrics_handler
                        ) -> MetricsServer:
    """/metrics over HTTP on host:port (0 picks a free port); `reuse_port` beside the rest of a group."""
    app = web.Application()
    app.add_routes([web.get("/metrics", handler)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
    except OSError as error:
        await runner.cleanup()
        raise OSError(f"cannot serve metrics on {host}:{port} ({error.strerror}); "
                      "pick another --metrics-port") from None
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return MetricsServer(runner, f"http://{shown}:{runner.addresses[0][1]}/metrics")

