"""A deployment across real hosts (network namespaces, `tests/netns.py`): etcd, the control plane, a prefill
worker, two decode workers, the router and the HTTP frontend each on a host of its own, over real TCP, and a
client host that drives them. Faults under steady load: kill -9 of prefill and of a decode worker, a SIGTERM
drain, etcd kill -9 and restart, and a decode host's link down then up. Each reports requests sent and
failed (by outcome), recovery time and what the workers still hold afterwards (`-s` prints it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.etcd_server import EtcdServer
from tests.netns import Host, Network
from tests.netns_client import PROMPTS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
MODEL = "sim-tiny"
GRPC_PORT, HTTP_PORT, METRICS_PORT = 50051, 8000, 9100
ROUTER_SERIES = ("dynamo_router_migrations_total", 'dynamo_router_prefills_total{where="fallback"}')
"""What the router counts of a fault: streams resumed on another decode worker, prompts prefilled on the
decode worker because the prefill worker was unreachable."""
ENGINE_FLAGS = ("--engine", "simulated", "--model", MODEL, "--decode-step-s", "0.01",
                "--kv-transports", "shm,grpc", "--kv-ttl-s", "3")
"""shm is offered too, so a test fails if two hosts ever took the one-host path."""
ROUTER_FLAGS = ("--metrics-port", str(METRICS_PORT), "--policy", "round_robin")
"""Decode workers in turn: requests keep reaching a decode host that is cut off, whatever its load."""
LOAD = {"concurrency": 6, "seconds": 8.0}
FAULT_AT_S = 2.0
"""After the load's first success."""
LINK_DOWN_S = 4.0
"""Longer than a prefill worker holds unpulled KV (--kv-ttl-s 3)."""


def _extra_flags() -> dict[str, list[str]]:
    """More flags per role (or "*" for every role) from NETNS_EXTRA_FLAGS, JSON such as {"*": ["--x", "1"]}:
    the same faults with other settings (TLS, say) without another test."""
    return json.loads(os.environ.get("NETNS_EXTRA_FLAGS", "{}"))


@dataclass
class Role:
    """A `dynamo-grpc` role process on a host, restartable on the next port."""

    name: str
    role: str
    host: Host
    args: tuple[str, ...]
    log_dir: Path
    port: int = GRPC_PORT
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)

    @property
    def endpoint(self) -> str:
        return f"{self.host.address}:{self.port}"

    def start(self, etcd: str) -> None:
        extra = _extra_flags()
        argv = [sys.executable, "-m", "dynamo_grpc.cli", self.role, "--host", self.host.address,
                "--port", str(self.port), "--node-name", self.host.name, "--etcd", etcd,
                "--namespace", "netns", "--lease-ttl-s", "2", *self.args, *extra.get("*", []),
                *extra.get(self.role, [])]
        self.log_path = self.log_dir / f"{self.name}-{self.port}.log"
        self.proc = self.host.popen(argv, self.log_path, env={**os.environ, "PYTHONPATH": str(REPO)})

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def restart_elsewhere(self, etcd: str) -> None:
        """Start again on the next port: the router's channel to the old address plays no part."""
        assert self.proc is not None and self.proc.wait(15) is not None
        self.port += 1
        self.start(etcd)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@dataclass
class Fleet:
    net: Network
    etcd: EtcdServer
    roles: dict[str, Role]
    log_dir: Path
    expected: dict[int, str] = field(default_factory=dict)
    """The one right text for each of PROMPTS."""

    @property
    def client(self) -> Host:
        return self.net.hosts["client"]

    @property
    def url(self) -> str:
        return f"http://{self.roles['frontend'].endpoint}"

    def ask(self, *argv: str, timeout_s: float = 60.0) -> Any:
        """Run `tests/netns_client.py` on the client host; the JSON it prints."""
        result = self.client.run([sys.executable, "-m", "tests.netns_client", *argv], timeout_s,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
        if result.returncode != 0:
            logs = "\n".join(f"--- {r.name}\n{r.log()}" for r in self.roles.values())
            raise AssertionError(f"netns_client {argv[0]} failed:\n{result.stderr[-3000:]}\n{logs}")
        return json.loads(result.stdout.splitlines()[-1])

    def wait_serving(self, *names: str) -> None:
        self.ask("wait-serving", *(self.roles[n].endpoint for n in names))

    def generate(self, prompt: str) -> dict[str, Any]:
        return self.ask("generate", self.roles["router"].endpoint, MODEL, prompt)

    def worker_stats(self) -> dict[str, dict[str, Any]]:
        by_endpoint = self.ask("stats", "--prefill", self.roles["prefill"].endpoint, "--decode",
                               self.roles["decode-a"].endpoint, "--decode", self.roles["decode-b"].endpoint)
        return {name: by_endpoint[self.roles[name].endpoint] for name in ("prefill", "decode-a", "decode-b")}

    def until_disaggregated(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Wait until a request through the router is prefilled on the prefill host; that answer."""
        deadline = time.monotonic() + timeout_s
        while True:
            answer = self.generate("across hosts")
            if answer["completion"].get("kv_transfer", {}).get("path"):
                return answer
            if time.monotonic() > deadline:
                raise AssertionError(f"no disaggregated request within {timeout_s} s: {answer}")
            time.sleep(0.5)

    def router_counts(self) -> Counter[str]:
        url = f"http://{self.roles['router'].host.address}:{METRICS_PORT}/metrics"
        return Counter(self.ask("metrics", url, *ROUTER_SERIES))

    def start_load(self, out: Path, seconds: float = LOAD["seconds"]) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "tests.netns_client", "load", self.url, MODEL, "--out", str(out),
                "--concurrency", str(LOAD["concurrency"]), "--seconds", str(seconds)]
        return self.client.popen(argv, self.log_dir / "load.log", env={**os.environ, "PYTHONPATH": str(REPO)})


def _start_fleet(net: Network, log_dir: Path) -> Fleet:
    etcd_host = net.hosts["etcd"]
    etcd = EtcdServer(log_dir / "etcd", host=etcd_host.address, run_in=etcd_host.command)
    etcd.start()
    roles = {
        "control-plane": Role("control-plane", "control-plane", net.hosts["control"], (), log_dir),
        "prefill": Role("prefill", "prefill", net.hosts["prefill"], ENGINE_FLAGS, log_dir),
        "decode-a": Role("decode-a", "decode", net.hosts["decode-a"], ENGINE_FLAGS, log_dir),
        "decode-b": Role("decode-b", "decode", net.hosts["decode-b"], ENGINE_FLAGS, log_dir),
        "router": Role("router", "router", net.hosts["router"], ROUTER_FLAGS, log_dir),
        "frontend": Role("frontend", "frontend", net.hosts["front"], (), log_dir, port=HTTP_PORT),
    }
    roles["frontend"].args = ("--router", roles["router"].endpoint)
    for role in roles.values():
        role.start(etcd.endpoint)
    fleet = Fleet(net, etcd, roles, log_dir)
    fleet.wait_serving("control-plane", "prefill", "decode-a", "decode-b", "router")
    fleet.until_disaggregated()
    return fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    log_dir = tmp_path_factory.mktemp("netns")
    with Network() as net:
        for name in ("etcd", "control", "prefill", "decode-a", "decode-b", "router", "front", "client"):
            net.add_host(name)
        fleet = _start_fleet(net, log_dir)
        try:
            yield fleet
        finally:
            for host in net.hosts.values():  # before etcd: a stopping worker deregisters there
                host.stop_processes()
            fleet.etcd.close()


@dataclass
class FaultReport:
    name: str
    records: list[dict[str, Any]]
    fault_at: float
    leftovers: dict[str, dict[str, Any]]
    router: Counter[str]
    """ROUTER_SERIES' increase over the load."""

    @property
    def failures(self) -> Counter[str]:
        return Counter(r["outcome"] for r in self.records if r["outcome"] != "ok")

    @property
    def recovery_s(self) -> float:
        """From the fault to the start of the first request that succeeded after the last one that failed (0
        when none failed; infinite when none succeeded after)."""
        failed = [r["end"] for r in self.records if r["outcome"] != "ok" and r["end"] >= self.fault_at]
        if not failed:
            return 0.0
        after = [r["start"] for r in self.records if r["outcome"] == "ok" and r["start"] >= max(failed)]
        return (min(after) if after else float("inf")) - self.fault_at

    @property
    def stalled(self) -> int:
        """Requests that took over 1 s (unhindered, one takes about 0.3 s)."""
        return sum(1 for r in self.records if r["end"] - r["start"] > 1.0)

    @property
    def slowest_across_fault_s(self) -> float:
        """The longest request among those in flight at the fault."""
        spans = [r["end"] - r["start"] for r in self.records if r["start"] <= self.fault_at <= r["end"]]
        return max(spans, default=0.0)

    def wrong_texts(self, expected: dict[int, str]) -> int:
        """Successful answers whose text is not the prompt's one right text (a token lost or repeated)."""
        return sum(1 for r in self.records if r["outcome"] == "ok" and r["text"] != expected[r["prompt"]])

    def line(self, expected: dict[int, str]) -> str:
        held = {name: (s.get("used_kv_blocks"), s.get("held_transfers")) if "error" not in s else s["error"]
                for name, s in self.leftovers.items()}
        return (f"{self.name}: sent {len(self.records)}, failed {sum(self.failures.values())} "
                f"{dict(self.failures)}, wrong text {self.wrong_texts(expected)}, "
                f"recovery {self.recovery_s:.2f} s, "
                f"slowest in flight {self.slowest_across_fault_s:.2f} s, over 1 s {self.stalled}, "
                f"migrated {self.router[ROUTER_SERIES[0]]:g}, "
                f"prefill fallbacks {self.router[ROUTER_SERIES[1]]:g}, "
                f"(used blocks, held transfers) {held}")


def _settled(fleet: Fleet, gone: str, timeout_s: float = 10.0) -> dict[str, dict[str, Any]]:
    """The stats of the workers (but `gone`, the one the fault stopped) once none holds a request, a block or
    a transfer (or, after `timeout_s`, as they are): a transfer the decode side never released is freed at
    the prefill's lease expiry (--kv-ttl-s 3)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = {name: s for name, s in fleet.worker_stats().items() if name != gone}
        busy = [s for s in stats.values() if "error" in s or s["active_requests"] or s["used_kv_blocks"]
                or s["held_transfers"]]
        if not busy or time.monotonic() > deadline:
            return stats
        time.sleep(0.5)


def _wait_ready(load: subprocess.Popen[bytes], ready: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        assert load.poll() is None and time.monotonic() < deadline, "the load never got an answer"
        time.sleep(0.1)


def under_load(fleet: Fleet, name: str, fault: Callable[[], None], gone: str = "",
               seconds: float = LOAD["seconds"]) -> FaultReport:
    """Run the load for `seconds`, `fault` FAULT_AT_S after its first success; what the load saw and what
    the workers (but `gone`) hold after."""
    out = fleet.log_dir / f"load-{name.replace(' ', '_')}.json"
    before = fleet.router_counts()
    load = fleet.start_load(out, seconds)
    _wait_ready(load, Path(f"{out}.ready"))
    time.sleep(FAULT_AT_S)
    fault_at = time.time()
    fault()
    assert load.wait(seconds + 60) == 0, (fleet.log_dir / "load.log").read_text()[-3000:]
    leftovers = _settled(fleet, gone)
    records = json.loads(out.read_text())
    report = FaultReport(name, records, fault_at, leftovers, fleet.router_counts() - before)
    print("\n" + report.line(fleet.expected))
    return report


def assert_nothing_held(report: FaultReport) -> None:
    for name, stats in report.leftovers.items():
        assert "error" not in stats, f"{name} did not answer GetStats after {report.name}: {stats}"
        assert (stats["active_requests"], stats["used_kv_blocks"], stats["held_transfers"]) == (0, 0, 0), \
            f"{name} still holds after {report.name}: {stats}"


def assert_lossless(report: FaultReport, expected: dict[int, str]) -> None:
    """README: drains, kill -9 of a worker (the decode worker prefills; the router migrates) and an etcd
    restart lose no request, and a migrated stream goes on with no token lost or repeated."""
    assert len(report.records) > 4 * LOAD["concurrency"], "the load hardly ran"
    assert report.records[0]["start"] < report.fault_at < report.records[-1]["end"]
    assert not report.failures, report.line(expected)
    assert report.wrong_texts(expected) == 0, report.line(expected)


@pytest.fixture(scope="module")
def expected(fleet: Fleet) -> dict[int, str]:
    """Each prompt's text as the fleet answers it before any fault (the simulated engine is deterministic)."""
    out = fleet.log_dir / "load-baseline.json"
    assert fleet.start_load(out).wait(LOAD["seconds"] + 60) == 0
    records = json.loads(out.read_text())
    texts = {k: {r["text"] for r in records if r["prompt"] == k and r["outcome"] == "ok"}
             for k in range(len(PROMPTS))}
    assert all(len(t) == 1 for t in texts.values()), texts
    assert not [r for r in records if r["outcome"] != "ok"], "the fleet fails without any fault"
    fleet.expected = {k: t.pop() for k, t in texts.items()}
    return fleet.expected


def test_disaggregated_request_moves_kv_between_hosts(fleet: Fleet) -> None:
    answer = fleet.until_disaggregated()
    transfer = answer["completion"]["kv_transfer"]
    assert transfer["path"] == "grpc", transfer  # shm is offered, but the two workers are on different hosts
    assert int(transfer["bytes"]) > 0 and not transfer.get("fallbacks"), transfer
    assert answer["completion"]["prefill_worker_id"].startswith("prefill-prefill-")  # its --node-name
    assert len(answer["token_ids"]) == 8


def test_kill_prefill_under_load(fleet: Fleet, expected: dict[int, str]) -> None:
    prefill = fleet.roles["prefill"]
    report = under_load(fleet, "kill -9 prefill", lambda: prefill.signal(signal.SIGKILL), "prefill")
    prefill.restart_elsewhere(fleet.etcd.endpoint)
    fleet.wait_serving("prefill")
    fleet.until_disaggregated()
    assert report.router[ROUTER_SERIES[1]] > 0, f"no request met the dead prefill: {report.line(expected)}"
    # The first refused call marks it down: the requests after it prefill on decode without trying it (47
    # of them each paid a refused connection before that).
    assert report.router[ROUTER_SERIES[1]] <= 2 * LOAD["concurrency"], report.line(expected)
    assert_lossless(report, expected)
    assert_nothing_held(report)


def test_kill_decode_under_load(fleet: Fleet, expected: dict[int, str]) -> None:
    decode = fleet.roles["decode-a"]
    report = under_load(fleet, "kill -9 decode", lambda: decode.signal(signal.SIGKILL), "decode-a")
    decode.restart_elsewhere(fleet.etcd.endpoint)
    fleet.wait_serving("decode-a")
    assert report.router[ROUTER_SERIES[0]] > 0, "no stream was cut by the kill: " + report.line(expected)
    # The first refused connection marks the worker down: later requests go elsewhere at once rather than
    # each failing over from it until its lease ends (30 migrations for 6 streams before that).
    assert report.router[ROUTER_SERIES[0]] <= 2 * LOAD["concurrency"], report.line(expected)
    assert_lossless(report, expected)
    assert_nothing_held(report)


def test_drain_decode_under_load(fleet: Fleet, expected: dict[int, str]) -> None:
    decode = fleet.roles["decode-a"]
    report = under_load(fleet, "SIGTERM decode", lambda: decode.signal(signal.SIGTERM), "decode-a")
    assert decode.proc is not None and decode.proc.wait(15) == 0, decode.log()
    decode.restart_elsewhere(fleet.etcd.endpoint)
    fleet.wait_serving("decode-a")
    assert_lossless(report, expected)
    assert_nothing_held(report)


def test_etcd_restart_under_load(fleet: Fleet, expected: dict[int, str]) -> None:
    def crash_and_restart() -> None:
        fleet.etcd.kill()
        time.sleep(2.0)
        fleet.etcd.start()

    report = under_load(fleet, "etcd kill -9 + restart", crash_and_restart)
    fleet.until_disaggregated()
    assert_lossless(report, expected)
    assert_nothing_held(report)


def test_decode_link_down_under_load(fleet: Fleet, expected: dict[int, str]) -> None:
    host = fleet.roles["decode-a"].host

    def link_flap() -> None:
        host.link_down()
        time.sleep(LINK_DOWN_S)
        host.link_up()

    report = under_load(fleet, f"decode link down {LINK_DOWN_S:g} s", link_flap,
                        seconds=LOAD["seconds"] + LINK_DOWN_S + 2)
    assert report.wrong_texts(expected) == 0, report.line(expected)
    assert_nothing_held(report)
    client_errors = [r for r in report.records if r["outcome"].startswith(("http_4", "stream_kv_handle"))]
    assert not client_errors, f"{report.line(expected)}; {client_errors[0].get('detail')}"
