"""The autoscaler's rules: steady under noise, quick up, slow down, to zero and back."""

from __future__ import annotations

import dataclasses
import itertools
import random

from control_plane.autoscaler import AutoscalingTuning, PoolAutoscaler, PoolCapacity, PoolMetrics, workers_for
from dynamo_grpc.slo import Objectives

OBJECTIVES = Objectives(ttft_ms=2000, itl_ms=100)

class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


CAPACITY = PoolCapacity(prefill_rps=1.25, decode_rps=2.5)  # 4P+2D serve 5 req/s


def autoscaler(clock: FakeClock, **kwargs: float) -> PoolAutoscaler:
    tuning = AutoscalingTuning(scale_down_cooldown_s=300, settle_s=60, idle_to_zero_s=600, **kwargs)
    return PoolAutoscaler(CAPACITY, OBJECTIVES, tuning, clock=clock)


def healthy(rate: float, prefill: int, decode: int) -> PoolMetrics:
    return PoolMetrics(arrival_rate=rate, ttft_p90_ms=900, itl_p90_ms=60, prefill_workers=prefill,
                       decode_workers=decode)


def count_changes(scaler: PoolAutoscaler, clock: FakeClock) -> int:
    noise = random.Random(3)
    counts = [(4, 2)]
    for _ in range(100):
        clock.now += 10
        # 4 prefill workers at 80% utilisation carry 4.0 req/s: the rate wanders across that line.
        rate = 4.0 * (1 + noise.uniform(-0.1, 0.1))
        decision = scaler.update(healthy(rate, *counts[-1]))
        counts.append((decision.prefill_workers, decision.decode_workers))
    return sum(a != b for a, b in itertools.pairwise(counts))


def test_noise_around_a_threshold_moves_a_pool_at_most_once_each_way() -> None:
    clock = FakeClock()
    assert count_changes(autoscaler(clock), clock) <= 2
    # Without the cooldown and the band, the same input flaps.
    clock = FakeClock()
    eager_tuning = AutoscalingTuning(scale_down_cooldown_s=0, scale_down_band=0)
    eager = PoolAutoscaler(CAPACITY, OBJECTIVES, eager_tuning, clock=clock)
    assert count_changes(eager, clock) > 20


def test_scale_down_waits_for_the_cooldown_and_scale_up_does_not() -> None:
    clock = FakeClock()
    scaler = autoscaler(clock)
    assert (scaler.update(healthy(5.0, 5, 3)).prefill_workers, scaler.desired.decode_workers) == (5, 3)
    for _ in range(30):  # first seen at 10 s, so until 300 s it has held for less than the cooldown
        clock.now += 10
        decision = scaler.update(healthy(1.5, 5, 3))
        assert (decision.prefill_workers, decision.decode_workers) == (5, 3)
    clock.now += 10
    decision = scaler.update(healthy(1.5, 5, 3))
    assert (decision.prefill_workers, decision.decode_workers) == (2, 1)
    # A burst a minute later is met at once.
    clock.now += 60
    decision = scaler.update(healthy(6.0, 2, 1))
    assert (decision.prefill_workers, decision.decode_workers) == (6, 3) and "needs" in decision.reason


def test_a_missed_objective_adds_a_worker_to_the_pool_that_misses_it_once_per_settle_window() -> None:
    clock = FakeClock()
    scaler = autoscaler(clock)
    slow_tokens = PoolMetrics(arrival_rate=2.0, ttft_p90_ms=900, itl_p90_ms=140, prefill_workers=2,
                              decode_workers=1)
    assert (scaler.update(slow_tokens).prefill_workers, scaler.desired.decode_workers) == (2, 2)
    clock.now += 10
    assert scaler.update(dataclasses.replace(slow_tokens, decode_workers=2)).decode_workers == 2  # settling
    clock.now += 60
    assert scaler.update(dataclasses.replace(slow_tokens, decode_workers=2)).decode_workers == 3
    queued_prefills = PoolMetrics(arrival_rate=2.0, ttft_p90_ms=4000, itl_p90_ms=60, prefill_queue=9,
                                  prefill_workers=2, decode_workers=3)
    clock.now += 10
    assert scaler.update(queued_prefills).prefill_workers == 3


def test_idle_scales_to_zero_and_the_first_request_brings_one_decode_worker_back() -> None:
    clock = FakeClock()
    scaler = autoscaler(clock)
    scaler.update(healthy(3.0, 3, 2))
    for _ in range(59):
        clock.now += 10
        decision = scaler.update(PoolMetrics(arrival_rate=0.0, prefill_workers=3, decode_workers=2))
        assert decision.decode_workers >= 1
    clock.now += 10
    decision = scaler.update(PoolMetrics(arrival_rate=0.0, prefill_workers=0, decode_workers=1))
    assert (decision.prefill_workers, decision.decode_workers) == (0, 0) and "zero" in decision.reason
    clock.now += 3600
    woken = scaler.request_arrived()
    assert (woken.prefill_workers, woken.decode_workers) == (0, 1)
    clock.now += 10
    decision = scaler.update(healthy(0.5, 0, 1))
    assert decision.decode_workers >= 1 and decision.prefill_workers >= 1


def test_worker_counts_round_up_but_not_for_float_noise() -> None:
    assert 0.1 * 3 / 0.3 > 1  # one worker-load, a hair over in floating point
    assert workers_for(0.1 * 3 / 0.3) == 1
    assert (workers_for(0.0), workers_for(0.2), workers_for(1.01), workers_for(4.0)) == (0, 1, 2, 4)
