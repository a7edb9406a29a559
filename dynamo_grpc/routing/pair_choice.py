"""The best pair for one request, without ranking every pair.

Pairs come in groups (`pairing.PairGroup`): every prefill worker of a group pairs with every decode worker
of it, so a fleet of 500 + 500 workers has 250,000 pairs. A policy ranks a pair by its prefill worker's part
plus its decode worker's part, then same host first (`policies.rank_pair`); over a group, the best pairs
are thus its best prefill workers with its best decode workers, found in one pass over each side. Of
equally ranked pairs the request takes the next in turn, in the order of all candidate pairs sorted by
(prefill worker, decode worker): the pair that ranking every pair would pick.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

from dynamo_grpc.routing.pairing import PairGroup
from dynamo_grpc.routing.policies import Load, Rank, RoutingPolicy


@dataclass(frozen=True)
class Side:
    """A group's candidates for a request: its live prefill workers, the decode workers it may use."""

    prefills: list[str]
    decodes: list[str]


def candidate_sides(groups: Sequence[PairGroup], live: Container[str], decodes: Container[str]) -> list[Side]:
    """Each group's live prefill workers and its decode workers among `decodes`, where both are some."""
    sides = []
    for group in groups:
        paired = [d for d in group.decodes if d in decodes]
        if paired:
            prefills = [p for p in group.prefills if p in live]
            if prefills:
                sides.append(Side(prefills, paired))
    return sides


@dataclass(frozen=True)
class _Best:
    """A side's best pairs: its best prefill workers (places in the side), each with its best decodes."""

    side: Side
    prefills: list[int]
    decodes: list[int]
    """Places in the side's decode workers, ascending."""
    near: dict[str, list[int]] | None = None
    """When the best pairs are the same-host ones: `decodes` by host."""

    def decodes_of(self, prefill: int, host_of: Callable[[str], str]) -> list[int]:
        return self.decodes if self.near is None else self.near[host_of(self.side.prefills[prefill])]


def choose_pair(sides: Sequence[Side], policy: RoutingPolicy, load: Load, host_of: Callable[[str], str],
                turn: int) -> tuple[str, str]:
    """The (prefill, decode) pair of the best rank; of equals, the first at or after position `turn` (modulo
    the number of pairs) in the sorted order of all pairs of `sides`."""
    best_rank: Rank | None = None
    best: list[_Best] = []
    for side in sides:
        prefill_part, prefills = _least(side.prefills, policy.rank_prefill, load)
        decode_part, decodes = _least(side.decodes, policy.rank_paired_decode, load)
        rank = tuple(p + d for p, d in zip(prefill_part, decode_part, strict=True))
        found = _Best(side, prefills, decodes)
        if policy.same_host_first:
            near: dict[str, list[int]] = {}
            for d in decodes:
                near.setdefault(host_of(side.decodes[d]), []).append(d)
            close = [p for p in prefills if host_of(side.prefills[p]) in near]
            if close:
                rank, found = (*rank, False), _Best(side, close, decodes, near)
            else:
                rank = (*rank, True)
        if best_rank is None or rank < best_rank:
            best_rank, best = rank, [found]
        elif rank == best_rank:
            best.append(found)
    ties = [(found, prefill) for found in best for prefill in found.prefills]
    if len(best) > 1:
        ties.sort(key=lambda tie: tie[0].side.prefills[tie[1]])
    return _in_turn(ties, sides, turn, host_of)


def _least(workers: list[str], rank: Callable[[str, Load], Rank], load: Load) -> tuple[Rank, list[int]]:
    """The least rank among `workers` and the places of those that have it, in order."""
    ranks = [rank(worker, load) for worker in workers]
    least = min(ranks)
    return least, [index for index, value in enumerate(ranks) if value == least]


def _in_turn(ties: list[tuple[_Best, int]], sides: Sequence[Side], turn: int, host_of: Callable[[str], str]
             ) -> tuple[str, str]:
    """Of the tied pairs (`ties`: their prefill workers, sorted), the first at or after position `turn % N`
    among all N pairs of `sides` sorted by ids, else the first of all."""
    start = turn % sum(len(side.prefills) * len(side.decodes) for side in sides)

    def before(tie: tuple[_Best, int]) -> int:
        """Where the pairs of the tie's prefill worker begin: after those of the prefill workers before it."""
        found, index = tie
        prefill = found.side.prefills[index]
        return sum(len(side.decodes) * (index if side is found.side else bisect_left(side.prefills, prefill))
                   for side in sides)

    def pair(tie: tuple[_Best, int], decode: int) -> tuple[str, str]:
        return tie[0].side.prefills[tie[1]], tie[0].side.decodes[decode]

    last = bisect_right(ties, start, key=before) - 1  # the last prefill worker whose pairs begin by `start`
    if last >= 0:
        decodes = ties[last][0].decodes_of(ties[last][1], host_of)
        at = bisect_left(decodes, start - before(ties[last]))
        if at < len(decodes):
            return pair(ties[last], decodes[at])
    tie = ties[last + 1] if last + 1 < len(ties) else ties[0]  # the next one, or a lap later the first
    return pair(tie, tie[0].decodes_of(tie[1], host_of)[0])
