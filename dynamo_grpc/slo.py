"""Service-level objectives: what a deployment promises each request, shared by the load generator's
goodput, the offline planner and the online autoscaler."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Objectives:
    """p90 targets (the planner and autoscaler) or per-request limits (goodput), in milliseconds."""

    ttft_ms: float = 1000.0
    """Time to first token."""
    itl_ms: float = 100.0
    """Inter-token latency."""
