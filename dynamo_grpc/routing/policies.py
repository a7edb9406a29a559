"""Routing policies: how a router ranks the candidate workers of one request.

A policy only ranks; `Fleet.route` gathers the candidates (the model's decode workers, their paired
prefill workers) and the load they carry, and takes the best. Equally ranked candidates take turns, so
a policy that ranks everything alike (round robin) visits them in order. A new policy is one class here
and one entry in `POLICIES`.

A pair ranks by its prefill worker's part plus its decode worker's part, item by item, then (for a
policy that prefers it) same host first: `rank_pair`. Ranks so built let the router find the best of
a group's pairs, every prefill worker with every decode worker, from the best of each side alone
(`routing/pair_choice.py`), so a fleet of 500 + 500 workers is not 250,000 pairs to rank per request.
Parts hold counts, or a share beside a zero in the other part, so their sums are exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

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
    same_host_first: bool
    """Whether, of pairs that rank alike otherwise, those on one host (KV over shared memory) come first."""

    def rank_decode(self, worker_id: str, load: Load) -> Rank:
        """A decode worker that would also prefill the prompt (no prefill worker is paired with it)."""
        ...

    def rank_prefill(self, worker_id: str, load: Load) -> Rank:
        """A prefill worker's part of the rank of a pair it is in."""
        ...

    def rank_paired_decode(self, worker_id: str, load: Load) -> Rank:
        """A decode worker's part of the rank of a pair it is in; as long as the prefill worker's part."""
        ...


def rank_pair(policy: RoutingPolicy, prefill_worker_id: str, decode_worker_id: str, same_host: bool,
              load: Load) -> Rank:
    """A pair's rank: its two workers' parts added item by item, then same host first if the policy asks."""
    parts = zip(policy.rank_prefill(prefill_worker_id, load),
                policy.rank_paired_decode(decode_worker_id, load), strict=True)
    rank = tuple(prefill + decode for prefill, decode in parts)
    return (*rank, not same_host) if policy.same_host_first else rank


class KvAware:
    """The prefill goes where it finishes first, counting what each prefix cache already holds; the
    decode goes to the least-loaded worker paired with that prefill worker."""

    name = "kv_aware"
    uses_prefix_cache = True
    same_host_first = True

    def rank_decode(self, worker_id: str, load: Load) -> Rank:
        return load.prefill_work(worker_id), load.kv_usage(worker_id)

    def rank_prefill(self, worker_id: str, load: Load) -> Rank:
        return load.prefill_work(worker_id), 0, 0.0

    def rank_paired_decode(self, worker_id: str, load: Load) -> Rank:
        return 0, load.requests_at(worker_id), load.kv_usage(worker_id)


class LeastLoaded:
    """The pair with the fewest requests running on its two workers."""

    name = "least_loaded"
    uses_prefix_cache = False
    same_host_first = True

    def rank_decode(self, worker_id: str, load: Load) -> Rank:
        return load.requests_at(worker_id), load.kv_usage(worker_id)

    def rank_prefill(self, worker_id: str, load: Load) -> Rank:
        return load.requests_at(worker_id), 0.0

    def rank_paired_decode(self, worker_id: str, load: Load) -> Rank:
        return load.requests_at(worker_id), load.kv_usage(worker_id)


class RoundRobin:
    """Every candidate in turn, whatever its load."""

    name = "round_robin"
    uses_prefix_cache = False
    same_host_first = False

    def rank_decode(self, worker_id: str, load: Load) -> Rank:
        return ()

    def rank_prefill(self, worker_id: str, load: Load) -> Rank:
        return ()

    def rank_paired_decode(self, worker_id: str, load: Load) -> Rank:
        return ()


POLICIES: dict[str, RoutingPolicy] = {policy.name: policy for policy in (KvAware(), LeastLoaded(), RoundRobin())}
DEFAULT_POLICY = KvAware.name


def routing_policy(name: str) -> RoutingPolicy:
    """The policy called `name`; an unknown name is refused with the known ones."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"routing policy must be one of {', '.join(POLICIES)}, got {name!r}") from None
