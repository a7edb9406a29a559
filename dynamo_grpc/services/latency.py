"""Recent latencies of one worker, so the autoscaler sees how the objectives fare where the work runs."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 30.0
"""Samples older than this leave the window (the proto's `WorkerStats` documents the same span)."""


class LatencyWindow:
    """Latency samples of the last `window_s` seconds and their 90th percentile."""

    def __init__(self, window_s: float = WINDOW_S, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, ms: float) -> None:
        self._samples.append((self._clock(), ms))

    def p90(self) -> float:
        """0.0 when the window holds no sample."""
        horizon = self._clock() - self._window_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()
        if not self._samples:
            return 0.0
        ordered = sorted(ms for _, ms in self._samples)
        return ordered[math.ceil(0.9 * len(ordered)) - 1]
