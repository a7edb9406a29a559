"""Routing policies: how a router ranks the candidate workers of one request.

A policy only ranks; `Fleet.route` gathers the candidates (the model's decode workers, their paired
prefill workers) and the load they carry, and takes the best. Equally ranked candidates take turns, so
a policy that ranks everything alike (round robin) visits them in order. A new policy is one class here
and one entry in `POLICIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from dynamo_grpc.v1 import control_plane_pb2 as cp_pb

Rank = tuple[float, ...]
"""Lower is better; compared item by item."""


@dataclass(frozen=True)
class Load:
    """What the router knows of each worker while it ranks one request."""

    requests_at: Callable[[str], int]
    """Requests running on the worker: the larger of what this router sent and what the worker reports."""
    kv_usage: Callable[[str], float]
    """Share of the worker's KV blocks in use (0 when unknown)."""
    prefill_work: Callable[[str], int]
    """Prompt tokens the worker must compute before this request's prefill there is done: the uncached
    tokens of requests in flight there plus this prompt's tokens its prefix cache does not hold."""


class RoutingPolicy(Protocol):
    name: str
    uses_prefix_cache: bool
    """Whether the policy reads the workers' prefix caches (the router then follows their KV events and
    tokenizes text prompts)."""

    def rank_decode(self, worker_id: str, load: Load) -> Rank:
        """A decode worker that would also prefill the prompt (no prefill worker is paired with it)."""
        ...

    def rank_pair(self, pair: cp_pb.Pairing, load: Load) -> Rank: ...


class KvAware:
    """The prefill goes where it finishes first, counting what each prefix cache already holds; the
    decode goes to the least-loaded worker paired with that prefill worker."""

    name = "kv_aware"
    uses_prefix_cache = True

    def rank_decode(self, worker_id: str, load: Load) -> Rank:
        return load.prefill_work(worker_id), load.kv_usage(worker_id)

    def rank_pair(self, pair: cp_pb.Pairing, load: Load) -> Rank:
        return (load.prefill_work(pair.prefill_worker_id), load.requests_at(pair.decode_worker_id),
                load.kv_usage(pair.decode_worker_id), not pair.same_host)


class LeastLoaded:
    """The pair with the fewest requests running on its two workers."""

    name = "least_loaded"
    uses_prefix_cache = False

    def rank_decode(self, worker_id: str, load: Load) -> Rank:
        return load.requests_at(worker_id), load.kv_usage(worker_id)

    def rank_pair(self, pair: cp_pb.Pairing, load: Load) -> Rank:
        return (load.requests_at(pair.decode_worker_id) + load.requests_at(pair.prefill_worker_id),
                load.kv_usage(pair.decode_worker_id), not pair.same_host)


class RoundRobin:
    """Every candidate in turn, whatever its load."""

    name = "round_robin"
    uses_prefix_cache = False

    def rank_decode(self, worker_id: str, load: Load) -> Rank:
        return ()

    def rank_pair(self, pair: cp_pb.Pairing, load: Load) -> Rank:
        return ()


POLICIES: dict[str, RoutingPolicy] = {policy.name: policy for policy in (KvAware(), LeastLoaded(), RoundRobin())}
DEFAULT_POLICY = KvAware.name


def routing_policy(name: str) -> RoutingPolicy:
    """The policy called `name`; an unknown name is refused with the known ones."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"routing policy must be one of {', '.join(POLICIES)}, got {name!r}") from None
