"""Online pool sizing: desired prefill and decode worker counts from periodic metrics of a live fleet.

`PoolAutoscaler` is pure logic with the clock injected: up at once when the objectives are missed or the
load outgrows the pools, down only after a lower size has been enough for a whole cooldown window, and to
zero after a long idle spell.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from dynamo_grpc.slo import Objectives

if TYPE_CHECKING:
    from control_plane.planner import PoolPlan


def _knob(default: float, help: str, *, flag: str = "", zero: str = "", at_most: float | None = None) -> Any:
    """A field of `AutoscalingTuning`: its default, what it does (the flag's help), how a deployment sets it.

    `flag` is the control plane's flag for it; without one the knob is the autoscaler's own and not in
    the spec. `zero` says what 0 means ("": 0 is not allowed); `at_most` bounds a share.
    """
    return field(default=default, metadata={"help": help, "flag": flag, "zero": zero, "at_most": at_most})


@dataclass(frozen=True)
class AutoscalingTuning:
    """How eagerly the pools follow the load: every autoscaling knob and its default, defined once.

    A knob with a flag is a field of the spec's `autoscaling` section under its own name and a flag of
    `dynamo-grpc control-plane` (`tuning_knobs`), so adding one here adds it to both.
    """

    target_utilisation: float = _knob(
        0.8, "share of each worker's rate a pool is sized to carry (at most 1)",
        flag="autoscale-target-utilisation", at_most=1.0)
    """Below 1 leaves room for bursts and for rates that are estimates; `dynamo-grpc plan --autoscale`
    writes 1 with rates its simulation verified."""
    interval_s: float = _knob(
        10.0, "how often to sample the workers", flag="autoscale-interval-s")
    rate_window_s: float = _knob(
        30.0, "the arrival rate is averaged over this long (shorter: follows bursts sooner, swings more)",
        flag="autoscale-rate-window-s")
    scale_down_cooldown_s: float = _knob(
        300.0, "a smaller pool must have been enough for this long before workers stop",
        flag="scale-down-cooldown-s", zero="at once")
    settle_s: float = _knob(
        60.0, "after adding a worker for a missed objective, wait this long before adding another",
        flag="scale-up-settle-s", zero="at once")
    idle_to_zero_s: float = _knob(
        600.0, "no traffic for this long stops every worker (0: never)", flag="idle-to-zero-s", zero="never")
    scale_down_band: float = _knob(
        0.15, "extra headroom, as a share of the rate, that a smaller pool must have before a pool shrinks "
        "to it, so noise around a threshold does not move a pool back and forth")
    max_queue_per_worker: float = _knob(
        4.0, "waiting requests per worker that make a pool short of workers, whatever the latencies")


@dataclass(frozen=True)
class Knob:
    """A knob of `AutoscalingTuning` that deployments set: spec field `name`, control plane flag `--flag`."""

    name: str
    flag: str
    default: float
    help: str
    zero: str
    """What 0 means; "": 0 is not allowed."""
    at_most: float | None

    def problem(self, value: float) -> str:
        """What is wrong with `value` for this knob on the command line; "" when nothing is."""
        if self.at_most is not None and not 0 < value <= self.at_most:
            return f"must be in (0, {self.at_most:g}]"
        if value < 0 or (value == 0 and not self.zero):
            return "must not be negative" if self.zero else "must be positive"
        return ""


def tuning_knobs() -> tuple[Knob, ...]:
    """The knobs of `AutoscalingTuning` that have a flag, in field order."""
    return tuple(Knob(name=f.name, default=f.default, **f.metadata) for f in fields(AutoscalingTuning)
                 if f.metadata["flag"])


@dataclass(frozen=True)
class PoolCapacity:
    """Requests/s one worker of each pool sustains within the objectives."""

    prefill_rps: float
    decode_rps: float

    @classmethod
    def from_plan(cls, plan: PoolPlan) -> PoolCapacity:
        """The planned rate shared over the planned workers: verified by simulation, so conservative.
        An aggregated plan has no prefill pool to size; its prefill rate is the decode one."""
        decode_rps = plan.workload.rate / plan.decode_workers
        return cls(prefill_rps=plan.workload.rate / plan.prefill_workers if plan.prefill_workers else decode_rps,
                   decode_rps=decode_rps)


@dataclass(frozen=True)
class PoolMetrics:
    """One observation window of the deployment."""

    arrival_rate: float
    """Requests/s that arrived in the window."""
    ttft_p90_ms: float | None = None
    itl_p90_ms: float | None = None
    prefill_queue: int = 0
    """Requests waiting for a prefill worker."""
    decode_queue: int = 0
    """Requests waiting for a decode slot (KV room)."""
    running_requests: int = 0
    """Requests generating tokens: a fleet with any is not idle, whatever the arrivals."""
    prefill_workers: int = 0
    decode_workers: int = 0


@dataclass(frozen=True)
class ScaleDecision:
    prefill_workers: int
    decode_workers: int
    reason: str = ""


@dataclass
class _PoolState:
    workers: int
    lower_since: float | None = None
    lower_target: int = 0
    last_scale_up: float = -math.inf


class PoolAutoscaler:
    """Desired prefill and decode worker counts from periodic metrics; pure logic, the clock injected.

    - Up, at once: to the count that keeps predicted utilisation (arrival rate / capacity) at
      `target_utilisation`, and one more in a pool that misses an objective or has a long queue (at most
      once per `settle_s` per pool, since a new worker takes time to help).
    - Down, slowly: only to a count with `scale_down_band` more headroom than the up rule needs, and only
      after every observation for `scale_down_cooldown_s` asked for it (then to the largest they asked for).
      Noise around a threshold therefore moves a pool up once and never back and forth.
    - To zero after `idle_to_zero_s` without traffic; back with one decode worker on the first request.
      Prefill goes to zero too: a decode worker prefills its own prompts when no prefill worker exists
      (the router falls back to it), so one GPU serves a cold start and an idle deployment holds none.
      The prefill pool returns with the next metrics that show load.
    """

    def __init__(self, capacity: PoolCapacity, objectives: Objectives,
                 tuning: AutoscalingTuning = AutoscalingTuning(), *,
                 clock: Callable[[], float] = time.monotonic, max_prefill: int = 64,
                 max_decode: int = 64) -> None:
        if capacity.prefill_rps <= 0 or capacity.decode_rps <= 0:
            raise ValueError("pool capacities must be positive")
        if not 0 < tuning.target_utilisation <= 1 or not 0 <= tuning.scale_down_band < 1:
            raise ValueError("target_utilisation must be in (0, 1] and scale_down_band in [0, 1)")
        self.capacity = capacity
        self.objectives = objectives
        self.tuning = tuning
        self._clock = clock
        self._idle_to_zero_s = tuning.idle_to_zero_s or math.inf  # 0: never
        self._limits = {"prefill": max_prefill, "decode": max_decode}
        self._pools: dict[str, _PoolState] | None = None
        self._last_traffic = clock()

    @property
    def desired(self) -> ScaleDecision:
        pools = self._pools or {"prefill": _PoolState(0), "decode": _PoolState(0)}
        return ScaleDecision(pools["prefill"].workers, pools["decode"].workers)

    def start_at(self, prefill: int, decode: int) -> None:
        """Begin from these pool sizes (the ones already running) instead of the first metrics' counts."""
        self._pools = {"prefill": _PoolState(prefill), "decode": _PoolState(decode)}

    def request_arrived(self) -> ScaleDecision:
        """Call on a request that found no decode worker: start one (a cold start)."""
        self._last_traffic = self._clock()
        pools = self._ensure_pools(0, 0)
        if pools["decode"].workers == 0:
            pools["decode"] = _PoolState(1, last_scale_up=self._last_traffic)
            return ScaleDecision(pools["prefill"].workers, 1, "cold start: first request, one decode worker")
        return self.desired

    def update(self, metrics: PoolMetrics) -> ScaleDecision:
        now = self._clock()
        pools = self._ensure_pools(metrics.prefill_workers, metrics.decode_workers)
        busy = metrics.arrival_rate > 0 or metrics.prefill_queue > 0 or metrics.decode_queue > 0 or \
            metrics.running_requests > 0
        if busy:
            self._last_traffic = now
        elif now - self._last_traffic >= self._idle_to_zero_s:
            if pools["prefill"].workers or pools["decode"].workers:
                self._pools = {"prefill": _PoolState(0), "decode": _PoolState(0)}
                return ScaleDecision(0, 0, f"no traffic for {now - self._last_traffic:.0f} s: scale to zero")
            return self.desired

        ttft_missed = metrics.ttft_p90_ms is not None and metrics.ttft_p90_ms > self.objectives.ttft_ms
        itl_missed = metrics.itl_p90_ms is not None and metrics.itl_p90_ms > self.objectives.itl_ms
        queues = {"prefill": metrics.prefill_queue, "decode": metrics.decode_queue}
        queue_per_worker = {role: queues[role] / max(1, pools[role].workers) for role in pools}
        short_of = {role: queue_per_worker[role] > self.tuning.max_queue_per_worker for role in pools}
        if ttft_missed:  # the first token waits on whichever pool is queueing more
            short_of[max(("prefill", "decode"), key=lambda role: queue_per_worker[role])] = True
        if itl_missed:
            short_of["decode"] = True
        missed = ttft_missed or itl_missed

        utilisation, band = self.tuning.target_utilisation, self.tuning.scale_down_band
        reasons = []
        for role, per_worker in (("prefill", self.capacity.prefill_rps), ("decode", self.capacity.decode_rps)):
            state = pools[role]
            floor = 1 if role == "decode" else 0
            needed = max(floor, workers_for(metrics.arrival_rate / (per_worker * utilisation)))
            enough_after_down = max(floor, workers_for(
                metrics.arrival_rate / (per_worker * utilisation * (1 - band))))
            target = needed
            if short_of[role] and now - state.last_scale_up >= self.tuning.settle_s:
                target = max(target, state.workers + 1)
            target = min(target, self._limits[role])
            if target > state.workers:
                why = "objective missed or queue long" if target > needed else \
                    f"{metrics.arrival_rate:.2f} req/s needs {needed}"
                if needed > self._limits[role]:
                    why += f", at most {self._limits[role]}"
                reasons.append(f"{role} {state.workers} -> {target} ({why})")
                pools[role] = _PoolState(target, last_scale_up=now)
            elif enough_after_down < state.workers and not missed:
                if state.lower_since is None:
                    state.lower_since, state.lower_target = now, enough_after_down
                state.lower_target = max(state.lower_target, enough_after_down)
                if now - state.lower_since >= self.tuning.scale_down_cooldown_s:
                    reasons.append(f"{role} {state.workers} -> {state.lower_target} (enough for "
                                   f"{now - state.lower_since:.0f} s)")
                    pools[role] = _PoolState(state.lower_target, last_scale_up=state.last_scale_up)
            else:
                state.lower_since = None
        decision = self.desired
        return ScaleDecision(decision.prefill_workers, decision.decode_workers, "; ".join(reasons))

    def _ensure_pools(self, prefill: int, decode: int) -> dict[str, _PoolState]:
        if self._pools is None:
            self._pools = {"prefill": _PoolState(prefill), "decode": _PoolState(decode)}
        return self._pools


def workers_for(load: float) -> int:
    """Workers that carry `load` worker-loads; float noise (3.0000000001) does not add one."""
    return math.ceil(load - 1e-9)
