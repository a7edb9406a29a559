"""A fleet of simulated engines on a virtual clock: GPU-scale what-ifs in seconds of CPU.

The engines are the real `SimulatedEngine` (its step loop, paged KV blocks and calibrated cost model);
only what lies between them is replaced. Requests go straight to an engine picked by the router's
policies (least loaded, prefix-cache aware from the engines' own KV events, or round robin), and a KV
transfer takes the time its modelled bytes need over a named link. Time is virtual:
whenever every task waits on a timer the clock jumps to the next one, so an hour of serving takes
seconds and no result depends on how busy this machine is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections import Counter
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from dynamo_grpc.engine.base import EngineRequest, Sampling
from dynamo_grpc.engine.cost_model import (
    KV_BYTES_PER_TOKEN,
    TRANSPORT_GBPS,
    check_tensor_parallel_size,
    load_tensor_parallel_cost,
    transfer_ms,
    worker_kv_memory_gb,
)
from dynamo_grpc.engine.simulated import SimulatedEngine, SimulatedEngineConfig
from dynamo_grpc.kv.events import PrefixIndex
from dynamo_grpc.kv.store import LeasedKvStore
from dynamo_grpc.kv.transport import KvReceiver, ReceivedKv
from dynamo_grpc.loadgen import RequestRecord, Workload, run_load
from dynamo_grpc.routing.fleet import InFlight
from dynamo_grpc.routing.policies import LeastLoaded, Load, rank_pair, routing_policy
from dynamo_grpc.v1 import common_pb2 as pb

T = TypeVar("T")

SIMULATED_ROUTING = LeastLoaded.name
"""The fleet simulator's default policy: for prompts that share no prefix it picks what kv_aware would."""
KV_MEMORY_GB = 40.0
"""HBM left for KV cache per simulated GPU after weights and activations (an assumption, not measured).
A TP-1 worker gets this; a TP-N worker gets `cost_model.worker_kv_memory_gb`."""


def kv_memory_for(model: str, tensor_parallel_size: int) -> float:
    """KV memory (GB) of one simulated worker: `KV_MEMORY_GB` at TP 1 (for the 70B shape, the calibration's
    model whose weights fit one device), the real bf16 weights' leftover at TP N (`worker_kv_memory_gb`)."""
    if tensor_parallel_size == 1:
        return KV_MEMORY_GB
    return worker_kv_memory_gb(model, tensor_parallel_size)


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer whenever nothing is ready to run.

    It steps in through two attributes of CPython's `BaseEventLoop` (`_ready`, `_scheduled`), stable since
    asyncio began; nothing here may wait on real I/O.
    """

    def __init__(self) -> None:
        super().__init__()
        self._virtual_now = 0.0

    def time(self) -> float:
        return self._virtual_now

    def _run_once(self) -> None:
        if not self._ready and self._scheduled:  # type: ignore[attr-defined]
            self._virtual_now = max(self._virtual_now, self._scheduled[0].when())  # type: ignore[attr-defined]
        super()._run_once()  # type: ignore[misc]


def run_virtual(coroutine: Coroutine[Any, Any, T]) -> T:
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


@dataclass(frozen=True)
class FleetShape:
    """Workers of one deployment; each is `tensor_parallel_size` simulated GPUs."""

    decode_workers: int
    prefill_workers: int = 0
    """0 means aggregated: every worker prefills its own requests."""
    decode_chunk_tokens: int = 2048
    """Token budget per step on decode (or aggregated) workers: how much prefill rides with decodes."""
    prefill_chunk_tokens: int = 8192
    link: str = "nvlink"
    """What KV crosses from prefill to decode workers (see `cost_model.LINK_GBPS`)."""
    transport: str = "nixl"
    """How KV moves over the link (see `cost_model.TRANSPORT_GBPS`)."""
    routing: str = SIMULATED_ROUTING
    """How requests pick engines, as the router's `--policy` (`routing/policies.py`)."""
    tensor_parallel_size: int = 1
    """GPUs per worker, in both pools: every engine prices its steps as a TP-N engine
    (`cost_model.TensorParallelStepCost`)."""

    def __post_init__(self) -> None:
        routing_policy(self.routing)  # refuses an unknown name
        if self.transport not in TRANSPORT_GBPS:
            raise ValueError(f"unknown KV transport {self.transport!r}; known: {', '.join(TRANSPORT_GBPS)}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")

    @property
    def workers(self) -> int:
        return self.decode_workers + self.prefill_workers

    @property
    def gpus(self) -> int:
        return self.workers * self.tensor_parallel_size

    def describe(self) -> str:
        routed = "" if self.routing == SIMULATED_ROUTING else f", {self.routing}"
        tp = f" x TP{self.tensor_parallel_size}" if self.tensor_parallel_size > 1 else ""
        if not self.prefill_workers:
            return f"agg {self.decode_workers}{tp} (chunk {self.decode_chunk_tokens}{routed})"
        moved = self.link if self.transport == "nixl" else f"{self.transport} over {self.link}"
        return f"disagg {self.prefill_workers}P+{self.decode_workers}D{tp} ({moved}{routed})"


class _LinkedTransport:
    """A decode engine's way to the prefill engines' stores: a KV transport across a modelled link."""

    kind = pb.KV_TRANSPORT_UNSPECIFIED

    def __init__(self, stores: dict[str, LeasedKvStore], modelled_bytes_per_token: int, link: str,
                 transport: str) -> None:
        self.name = transport
        self._link = link
        self._stores = stores
        self._bytes_per_token = modelled_bytes_per_token

    def reaches(self, handle: pb.KvHandle) -> bool:
        return handle.endpoint in self._stores

    async def fetch(self, handle: pb.KvHandle, *, segment: str, fingerprint: str, request_id: str) -> ReceivedKv:
        data = self._stores[handle.endpoint].claim(handle.transfer_id, handle.pull_token, fingerprint)
        nbytes = handle.num_tokens * self._bytes_per_token
        ms = transfer_ms(nbytes, self._link, self.name)
        await asyncio.sleep(ms / 1e3)
        return ReceivedKv(data=bytes(data), stats=pb.KvTransferStats(bytes=nbytes, duration_us=int(ms * 1e3),
                                                                     path=self.name))

    async def release(self, handle: pb.KvHandle, *, request_id: str) -> bool:
        return self._stores[handle.endpoint].release(handle.transfer_id, handle.pull_token)


@dataclass
class FleetRun:
    """What a simulated run produced: each request's record, and each engine's stats at the end."""

    records: list[RequestRecord]
    prefill_stats: dict[str, pb.WorkerStats]
    """By engine name, the engines that prefilled: the prefill pool, or every engine when aggregated."""

    @property
    def prefix_hit_rate(self) -> float:
        """Share of prompt tokens the prefilling engines found in their prefix caches."""
        return _hit_rate(self.prefill_stats.values())

    @property
    def prefix_hit_rates(self) -> dict[str, float]:
        """The same share per prefilling engine: shows whether a policy spreads or piles up the hits."""
        return {name: _hit_rate([stats]) for name, stats in self.prefill_stats.items()}


def _hit_rate(engines: Iterable[pb.WorkerStats]) -> float:
    prompt = hits = 0
    for stats in engines:
        prompt += stats.prompt_tokens
        hits += stats.prefix_cache_hit_tokens
    return hits / prompt if prompt else 0.0


class _Picker:
    """The router's choice among a pool's engines: its routing policy's ranks (`routing/policies.py`), equally
    ranked engines taking turns, and kv_aware reading a prefix index fed by the engines' KV events. Two
    differences from `Fleet.route`: there are no pairings (any prefill engine reaches any decode engine), and
    the decode engine is picked when its prefill is done rather than on arrival."""

    def __init__(self, routing: str, index: PrefixIndex) -> None:
        self.policy = routing_policy(routing)
        self._index = index
        self.in_flight = InFlight()
        self._turns: Counter[int] = Counter()

    def pick(self, pool: dict[str, SimulatedEngine], prompt: list[int], *, prefilled_on: str = ""
             ) -> tuple[str, int]:
        """The engine's name and the prompt tokens it has to compute; `prefilled_on` names the prefill engine
        that computed the prompt's KV, when the pick is the decode engine of a disaggregated request."""
        turn = self._turns[id(pool)] % len(pool)
        self._turns[id(pool)] += 1
        names = list(pool)
        names = names[turn:] + names[:turn]
        prefills = not prefilled_on
        cached = self._index.cached_tokens(prompt, names) if self.policy.uses_prefix_cache and prefills else {}

        def uncached(name: str) -> int:
            return len(prompt) - cached.get(name, 0) if prefills else 0

        load = Load(requests_at=self.in_flight.requests.__getitem__, kv_usage=lambda name: 0.0,
                    prefill_work=lambda name: self.in_flight.tokens[name] + uncached(name))
        if prefills:
            name = min(names, key=lambda name: self.policy.rank_decode(name, load))
        else:
            name = min(names, key=lambda name: rank_pair(self.policy, prefilled_on, name, True, load))
        return name, uncached(name)


async def simulate(shape: FleetShape, workload: Workload, *, model: str = "llama3_70b",
                   kv_memory_gb: float | None = None) -> list[RequestRecord]:
    """Serve the workload on the fleet; run it under `run_virtual`."""
    return (await run_fleet(shape, workload, model=model, kv_memory_gb=kv_memory_gb)).records


async def run_fleet(shape: FleetShape, workload: Workload, *, model: str = "llama3_70b",
                    kv_memory_gb: float | None = None) -> FleetRun:
    """`simulate`, with the engines' stats (prefix-cache hits among them) as well.

    `kv_memory_gb` is per worker (all of its GPUs); by default `kv_memory_for(model, tensor_parallel_size)`.
    """
    tp = shape.tensor_parallel_size
    check_tensor_parallel_size(model, tp)
    if kv_memory_gb is None:
        kv_memory_gb = kv_memory_for(model, tp)
    if kv_memory_gb <= 0:
        raise ValueError(f"a TP-{tp} worker of {model} has no KV memory left ({kv_memory_gb:.0f} GB): "
                         "its weights do not fit")
    cost = load_tensor_parallel_cost(model, tp)
    block_size = 16
    blocks = int(kv_memory_gb * 1e9 / KV_BYTES_PER_TOKEN[model] / block_size)
    base = SimulatedEngineConfig(model=model, cost_model=model, block_size=block_size, num_blocks=blocks,
                                 kv_bytes_per_token=4, max_batch_size=100_000, max_model_len=1 << 20)
    stores = {f"prefill-{i}": LeasedKvStore(endpoint=f"prefill-{i}", host="sim", ttl_s=3600)
              for i in range(shape.prefill_workers)}
    prefills = {name: SimulatedEngine(dataclasses.replace(base, max_num_batched_tokens=shape.prefill_chunk_tokens),
                                      kv_store=store, cost=cost) for name, store in stores.items()}
    receiver = KvReceiver([_LinkedTransport(stores, KV_BYTES_PER_TOKEN[model], shape.link, shape.transport)])
    decodes = {f"decode-{i}": SimulatedEngine(dataclasses.replace(base, max_num_batched_tokens=shape.decode_chunk_tokens),
                                              kv_receiver=receiver, cost=cost) for i in range(shape.decode_workers)}
    prefilling = prefills or decodes
    index = PrefixIndex()
    picker = _Picker(shape.routing, index)
    ids = itertools.count()
    loop = asyncio.get_running_loop()

    async def follow(name: str, engine: SimulatedEngine) -> None:
        assert engine.kv_events is not None
        async for change in engine.kv_events.watch():
            index.apply(name, change)

    async def send(prompt: list[int], max_tokens: int, record: RequestRecord) -> None:
        rid = f"r{next(ids)}"
        request = EngineRequest(rid, tuple(prompt), Sampling(max_tokens=max_tokens, temperature=0.0,
                                                            ignore_eos=True))
        prefilled_on = ""
        if prefills:
            prefilled_on, uncached = picker.pick(prefills, prompt)
            with picker.in_flight.busy(prefilled_on, uncached):
                async for out in prefills[prefilled_on].generate(dataclasses.replace(request, produce_kv=True)):
                    if out.kv_handle is not None:
                        request = dataclasses.replace(request, kv_handle=out.kv_handle)
        name, uncached = picker.pick(decodes, prompt, prefilled_on=prefilled_on)
        with picker.in_flight.busy(name, uncached):
            async for out in decodes[name].generate(request):
                record.token_times += [loop.time()] * len(out.token_ids)

    feeds = [asyncio.create_task(follow(name, engine)) for name, engine in prefilling.items()
             if picker.policy.uses_prefix_cache]
    try:
        records = await run_load(send, workload, progress=False, clock=loop.time)
    finally:
        for feed in feeds:
            feed.cancel()
        await asyncio.gather(*feeds, return_exceptions=True)
    return FleetRun(records, {name: engine.stats() for name, engine in prefilling.items()})
