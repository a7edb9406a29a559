"""Many concurrent streams through one HTTP frontend for a while: what fails (by code), what memory it takes.

etcd, the control plane, a prefill and a decode worker (simulated engine) and one HTTP frontend (routing in
its own process, as `frontend --etcd` runs) start as the CLI runs them, on loopback. `--streams` clients then
stream /v1/completions in a closed loop (each sends its next request when the last ended) for `--seconds`.
It prints requests and failures by code (an HTTP status, or the code of an error event in the stream)
with one message of each, how many 429 answers carried `Retry-After`, and per process its RSS before the
load, at its peak during it, and 5 s after it (memory given back).

    python bench/stream_load.py --streams 1000 --seconds 60     # the benchmark
    python bench/stream_load.py                                  # a smoke run: 50 streams for 5 s
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from dynamo_grpc.loadgen import RequestRecord, openai_sender

REPO = Path(__file__).resolve().parent.parent
MODEL = "sim-tiny"
ENGINE = ("--engine", "simulated", "--model", MODEL, "--decode-step-s", "0.01")
REQUEST_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    """Resident memory of one process, MiB (0 once it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Deployment:
    """The processes, each in a process group of its own with its log in `log_dir`."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> None:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True,
                                                env={**os.environ, "PYTHONPATH": str(REPO)})

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def rss(self) -> dict[str, float]:
        """Each process's RSS, and this one's (the client)."""
        rss = {name: rss_mib(proc.pid) for name, proc in self.procs.items()}
        return {**rss, "client": rss_mib(os.getpid())}

    def stop(self) -> None:
        for proc in reversed(self.procs.values()):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def start(deployment: Deployment) -> str:
    """Start everything; the frontend's URL."""
    etcd_port, peer_port, http_port = free_port(), free_port(), free_port()
    client, peer = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer_port}"
    etcd = shutil.which("etcd") or "/usr/bin/etcd"
    deployment.start("etcd", [etcd, "--data-dir", str(deployment.log_dir / "etcd"),
                              "--listen-client-urls", client, "--advertise-client-urls", client,
                              "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                              "--initial-cluster", f"bench={peer}", "--name", "bench"])
    common = ("--etcd", f"127.0.0.1:{etcd_port}", "--namespace", "stream-load")
    cli = [sys.executable, "-m", "dynamo_grpc.cli"]
    deployment.start("control-plane", [*cli, "control-plane", *common])
    deployment.start("prefill", [*cli, "prefill", *common, *ENGINE])
    deployment.start("decode", [*cli, "decode", *common, *ENGINE])
    deployment.start("frontend", [*cli, "frontend", *common, "--port", str(http_port), "--workers", "1"])
    return f"http://127.0.0.1:{http_port}"


async def until_answering(deployment: Deployment, url: str, timeout_s: float = 120.0) -> None:
    """Until a completion goes through (every part is up and the frontend sees the pair)."""
    deadline = time.monotonic() + timeout_s
    body = {"model": MODEL, "prompt": "ready?", "max_tokens": 2}
    async with aiohttp.ClientSession() as session:
        while True:
            deployment.check_alive()
            with contextlib.suppress(aiohttp.ClientError):
                async with session.post(f"{url}/v1/completions", json=body) as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no completion from {url} within {timeout_s:.0f} s")
            await asyncio.sleep(0.5)


def error_code(error: Exception) -> str:
    """The code a failure is counted under: `HTTP 503`, `stream error`, or the exception's type."""
    text = str(error)
    if isinstance(error, RuntimeError) and text.startswith("HTTP "):
        return text.split(":", 1)[0]
    if isinstance(error, RuntimeError) and text.startswith("stream error"):
        return "stream error: " + text.split(":", 1)[1].strip()[:80]
    return type(error).__name__


@dataclass
class Outcome:
    records: list[RequestRecord] = field(default_factory=list)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)
    """One message per failure code."""
    retry_after: collections.Counter[bool] = field(default_factory=collections.Counter)
    """429 answers by whether they carried a Retry-After header."""
    peak: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))
    """Each process's peak RSS, MiB."""


def count_retry_after(outcome: Outcome) -> aiohttp.TraceConfig:
    async def on_request_end(session: object, context: object, params: aiohttp.TraceRequestEndParams) -> None:
        if params.response.status == 429:
            outcome.retry_after["Retry-After" in params.response.headers] += 1

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    return trace


async def closed_loop(url: str, streams: int, seconds: float, max_tokens: int, deployment: Deployment
                      ) -> Outcome:
    """`streams` clients for `seconds`: what they saw, and each process's peak RSS."""
    outcome = Outcome()
    records, failures, peak = outcome.records, outcome.failures, outcome.peak
    stop_at = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     trace_configs=[count_retry_after(outcome)]) as session:
        send = openai_sender(url, MODEL, session)

        async def client(index: int) -> None:
            prompt = [(index * 7 + i) % 250 for i in range(32)]
            while time.monotonic() < stop_at:
                record = RequestRecord(len(prompt), time.perf_counter())
                records.append(record)
                try:
                    await send(prompt, max_tokens, record)
                except Exception as error:  # noqa: BLE001 - a failed request is counted, not fatal to the run
                    record.error = str(error)[:200]
                    failures[error_code(error)] += 1
                    outcome.examples.setdefault(error_code(error), record.error)
                record.ended = time.perf_counter()

        async def sample_memory() -> None:
            while time.monotonic() < stop_at + REQUEST_TIMEOUT_S:
                for name, mib in deployment.rss().items():
                    peak[name] = max(peak[name], mib)
                await asyncio.sleep(0.5)

        sampler = asyncio.ensure_future(sample_memory())
        await asyncio.gather(*(client(i) for i in range(streams)))
        sampler.cancel()
    return outcome


async def main(args: argparse.Namespace) -> int:
    deployment = Deployment(Path(tempfile.mkdtemp(prefix="stream-load-")))
    try:
        url = start(deployment)
        await until_answering(deployment, url)
        before = deployment.rss()
        started = time.perf_counter()
        outcome = await closed_loop(url, args.streams, args.seconds, args.max_tokens, deployment)
        elapsed = time.perf_counter() - started
        await asyncio.sleep(5.0)
        after = deployment.rss()
        deployment.check_alive()
    finally:
        deployment.stop()
    records, failures = outcome.records, outcome.failures
    done = [r for r in records if not r.error]
    tokens = sum(len(r.token_times) for r in done)
    print(f"{args.streams} streams for {args.seconds:g} s ({elapsed:.1f} s with the last requests): "
          f"{len(records)} requests, {len(done)} succeeded, {sum(failures.values())} failed, "
          f"{tokens / elapsed:,.0f} tokens/s")
    for code, count in failures.most_common():
        print(f"  failed {count:6d}  {code}  e.g. {outcome.examples[code]!r}")
    if outcome.retry_after:
        print(f"  429 with Retry-After: {outcome.retry_after[True]}, without: {outcome.retry_after[False]}")
    ttfts = sorted(r.ttft for r in done if r.ttft is not None)
    if ttfts:
        p50, p99 = ttfts[len(ttfts) // 2], ttfts[int(len(ttfts) * 0.99)]
        print(f"TTFT p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms")
    print(f"{'process':<14}{'RSS before':>12}{'peak':>10}{'5 s after':>12}  (MiB)")
    for name in [*deployment.procs, "client"]:
        print(f"{name:<14}{before.get(name, 0):>12.0f}{outcome.peak[name]:>10.0f}{after.get(name, 0):>12.0f}")
    print(f"logs: {deployment.log_dir}")
    return 1 if not done else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=50, help="concurrent streams (closed loop)")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long new requests are sent")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args(sys.argv[1:]))))
