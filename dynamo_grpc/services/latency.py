"""Recent latencies of one worker, so the autoscaler sees how the objectives fare where the work runs."""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 30.0
"""Samples older than this leave the window (the proto's `WorkerStats` documents the same span)."""


class LatencyWindow:
    """Latency samples of the last `window_s` seconds and their 90th percentile.

    The samples are also kept sorted, so every router's stats poll reads the percentile by index instead of
    sorting the whole window (thousands of samples under load); a sample costs two binary searches.
    """

    def __init__(self, window_s: float = WINDOW_S, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque()
        self._sorted: list[float] = []

    def add(self, ms: float) -> None:
        now = self._clock()
        self._expire(now)
        self._samples.append((now, ms))
        bisect.insort(self._sorted, ms)

    def p90(self) -> float:
        """0.0 when the window holds no sample."""
        self._expire(self._clock())
        if not self._sorted:
            return 0.0
        return self._sorted[math.ceil(0.9 * len(self._sorted)) - 1]

    def _expire(self, now: float) -> None:
        horizon = now - self._window_s
        while self._samples and self._samples[0][0] < horizon:
            _, ms = self._samples.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, ms)]
