"""CPU core sets for engines that run on CPUs: written as Linux lists them (`0-3,8`), split evenly.

Two engines on one host must not pin their threads to the same cores: a thread preempted on a shared core
stalls its engine's whole parallel step. `serve` and a compiled plan's CPU hosts give each engine worker its
own share of the host's cores (see `split`).
"""

from __future__ import annotations

import os
import re

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse(text: str) -> tuple[int, ...]:
    """`0-3,8` -> (0, 1, 2, 3, 8); a malformed list is refused with what is expected."""
    cores: set[int] = set()
    for part in text.replace(" ", "").split(","):
        match = _RANGE.match(part)
        first, last = (int(match[1]), int(match[2] or match[1])) if match else (1, 0)
        if last < first:
            raise ValueError(f"expected CPU ids like 0-3,8, got {text!r}")
        cores.update(range(first, last + 1))
    return tuple(sorted(cores))


def format_list(cores: tuple[int, ...] | list[int]) -> str:
    """(0, 1, 2, 3, 8) -> `0-3,8`."""
    ranges: list[list[int]] = []
    for core in sorted(cores):
        if ranges and core == ranges[-1][1] + 1:
            ranges[-1][1] = core
        else:
            ranges.append([core, core])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def split(cores: tuple[int, ...], parts: int) -> list[tuple[int, ...]] | None:
    """`cores` in `parts` disjoint consecutive shares, the larger shares first (7 cores in 2: 4 + 3); None
    when there are fewer cores than parts, so that some would have to share."""
    if parts < 1 or len(cores) < parts:
        return None
    size, larger = divmod(len(cores), parts)
    shares, start = [], 0
    for index in range(parts):
        end = start + size + (index < larger)
        shares.append(cores[start:end])
        start = end
    return shares


def usable() -> tuple[int, ...]:
    """The cores this process may run on."""
    return tuple(sorted(os.sched_getaffinity(0)))
