"""Autoscaling on a live fleet: a load that comes and goes, and the workers `up` runs meanwhile.

Starts etcd and `dynamo-grpc up` (in this process) for an autoscaled spec of simulated engines (at most
3 prefill + 3 decode workers, each declared good for 1.5 req/s), then sends Poisson load in phases:
idle, low, high, low, idle. Every second it records the control plane's scale target and the workers
registered; every request's outcome and TTFT are kept. It prints the timeline, each phase's answered
share and TTFT, the cold-start delay, and the worker-seconds used against a static fleet of the most
workers for the same time.

The per-worker rates are declared, not measured (the simulated engine is far faster): this measures the
control loop (how fast the pools follow the load, whether they flap, whether every request is answered
across scale-down and scale-to-zero), not the capacity estimate.

    python bench/autoscaling.py            # about two minutes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from control_plane.compiler import compile_spec
from control_plane.spec import parse_spec
from control_plane.supervisor import Supervisor
from dynamo_grpc.client import RouterClient
from dynamo_grpc.registry import SCALE_DOCUMENT, EtcdRegistry
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb
from tests.etcd_server import EtcdServer, free_port

MODEL = "sim-tiny"
MOST = 3
PHASES = (("idle", 0.0, 15.0), ("low", 1.0, 30.0), ("high", 4.0, 30.0), ("low", 1.0, 30.0), ("idle", 0.0, 25.0))


def spec_text(etcd: str) -> str:
    return f"""
name: autoscaling-bench
model: {{served_name: {MODEL}, engine: simulated, engine_args: {{decode_step_s: 0.01}}}}
hosts: [{{name: here, address: 127.0.0.1}}]
prefill: {{workers: {MOST}}}
decode: {{workers: {MOST}}}
router: {{port: {free_port()}}}
control_plane: {{port: {free_port()}}}
base_port: {free_port()}
slo: {{ttft_ms: 2000, itl_ms: 200}}
autoscaling: {{prefill_requests_per_s: 1.5, decode_requests_per_s: 1.5, interval_s: 0.5, rate_window_s: 8,
               scale_down_cooldown_s: 8, settle_s: 2, idle_to_zero_s: 10, cold_start_wait_s: 60}}
etcd: [{etcd}]
"""


@dataclass
class Outcome:
    phase: int
    sent_at: float
    ttft_s: float | None = None
    error: str = ""


@dataclass
class Timeline:
    rows: list[tuple[float, int, tuple[int, int], tuple[int, int]]] = field(default_factory=list)
    """(seconds since start, phase, target P/D, registered P/D)"""


async def one_request(router: str, outcome: Outcome) -> None:
    started = time.monotonic()
    try:
        async with RouterClient(router) as client:
            async for response in client.generate(list(range(20, 120)), model=MODEL, max_tokens=16):
                if response.HasField("tokens") and outcome.ttft_s is None:
                    outcome.ttft_s = time.monotonic() - started
    except Exception as error:  # noqa: BLE001 - counted and reported
        outcome.error = str(error)[:120]


async def load(router: str, outcomes: list[Outcome], phase_now: list[int], seed: int) -> None:
    rng = random.Random(seed)
    tasks = []
    for index, (_, rate, seconds) in enumerate(PHASES):
        phase_now[0] = index
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if rate == 0:
                await asyncio.sleep(min(0.2, end - time.monotonic()))
                continue
            await asyncio.sleep(rng.expovariate(rate))
            if time.monotonic() >= end:
                break
            outcome = Outcome(phase=index, sent_at=time.monotonic())
            outcomes.append(outcome)
            tasks.append(asyncio.ensure_future(one_request(router, outcome)))
    await asyncio.gather(*tasks)


async def watch(registry: EtcdRegistry, timeline: Timeline, phase_now: list[int], started: float) -> None:
    while True:
        data = await registry.get_document(SCALE_DOCUMENT)
        target = cp_pb.ScaleTarget.FromString(data) if data else cp_pb.ScaleTarget()
        workers = await registry.list_workers()
        registered = (sum(w.role == pb.WORKER_ROLE_PREFILL for w in workers),
                      sum(w.role == pb.WORKER_ROLE_DECODE for w in workers))
        timeline.rows.append((time.monotonic() - started, phase_now[0],
                              (target.prefill_workers, target.decode_workers), registered))
        await asyncio.sleep(1.0)


def report(timeline: Timeline, outcomes: list[Outcome], targets: list[cp_pb.ScaleTarget]) -> None:
    print("\n  t(s)  phase        target P/D   registered P/D")
    last = None
    for t, phase, target, registered in timeline.rows:
        if (phase, target, registered) != last:
            name, rate, _ = PHASES[phase]
            print(f"  {t:4.0f}  {name:<4} {rate:3.1f}/s   {target[0]}/{target[1]}          {registered[0]}/{registered[1]}")
            last = (phase, target, registered)
    print("\n  phase          sent  answered  TTFT p50   TTFT p90")
    for index, (name, rate, _) in enumerate(PHASES):
        mine = [o for o in outcomes if o.phase == index]
        if not mine:
            continue
        ttfts = sorted(o.ttft_s * 1e3 for o in mine if o.ttft_s is not None and not o.error)
        answered = sum(1 for o in mine if not o.error)
        p50 = statistics.median(ttfts) if ttfts else float("nan")
        p90 = ttfts[max(0, int(0.9 * len(ttfts)) - 1)] if ttfts else float("nan")
        print(f"  {index} {name:<4} {rate:3.1f}/s  {len(mine):5d}  {answered / len(mine):8.1%}  {p50:7.0f} ms {p90:7.0f} ms")
    errors = sorted({o.error for o in outcomes if o.error})
    for error in errors[:5]:
        print(f"  error: {error}")
    first = min((o for o in outcomes if o.ttft_s is not None), key=lambda o: o.sent_at, default=None)
    if first is not None and first.ttft_s is not None:
        print(f"\n  cold start: the first request after the idle phase got its first token in {first.ttft_s:.2f} s")
    seconds = [b[0] - a[0] for a, b in zip(timeline.rows, timeline.rows[1:], strict=False)]
    used = sum(dt * sum(row[3]) for dt, row in zip(seconds, timeline.rows, strict=False))
    static = sum(seconds) * 2 * MOST
    print(f"  worker-seconds: {used:.0f} autoscaled against {static:.0f} for a static {MOST}P+{MOST}D fleet "
          f"(ratio {used / static:.2f})")
    changes = [(t.version, t.prefill_workers, t.decode_workers, t.reason) for t in targets]
    print(f"  scale target changes: {len(changes)}")
    for version, prefill, decode, reason in changes:
        print(f"    v{version}: {prefill}P {decode}D  {reason}")


async def main(seed: int) -> None:
    with tempfile.TemporaryDirectory() as state, EtcdServer(Path(state) / "etcd") as etcd:
        plan = compile_spec(parse_spec(spec_text(etcd.endpoint)))
        supervisor = Supervisor(plan, "here", Path(state) / "up")
        stop = asyncio.Event()
        supervising = asyncio.ensure_future(supervisor.run(stop))
        registry = EtcdRegistry([etcd.endpoint], namespace=plan.namespace)
        await registry.connect()
        targets: list[cp_pb.ScaleTarget] = []

        async def record() -> None:
            async for data in registry.watch_document(SCALE_DOCUMENT):
                if data:
                    targets.append(cp_pb.ScaleTarget.FromString(data))

        timeline, outcomes, phase_now = Timeline(), [], [0]
        started = time.monotonic()
        background = [asyncio.ensure_future(record()),
                      asyncio.ensure_future(watch(registry, timeline, phase_now, started))]
        print(f"autoscaling bench: phases {', '.join(f'{n} {r:g}/s for {s:g} s' for n, r, s in PHASES)}",
              file=sys.stderr, flush=True)
        try:
            await load(plan.by_role("router")[0].endpoint, outcomes, phase_now, seed)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            stop.set()
            with contextlib.suppress(Exception):
                await supervising
            await registry.close()
        report(timeline, outcomes, targets)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    asyncio.run(main(parser.parse_args().seed))
