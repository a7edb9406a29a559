"""Size the prefill and decode pools for a workload and its latency objectives, offline.

Offline, `plan_pools` picks the fewest GPUs that meet a TTFT and an ITL objective at a given arrival
rate. The calibrated step cost model gives a first guess in microseconds; the guess is then checked,
and corrected, by serving the workload on a simulated fleet (`dynamo_grpc.fleetsim`), because queueing,
batch fluctuation and prefill/decode interference are what decide the answer near the objectives and
closed-form estimates get them only roughly right. `pool_plan_to_spec` turns the answer into a
deployment spec that `dynamo-grpc compile` accepts.

Online sizing (a live fleet's metrics to pool sizes) is `control_plane.autoscaler`.

Tensor parallelism: given `tp_options`, every TP is estimated and, cheapest first, searched; the plan
counts GPUs as workers x TP. A TP-N step is the one-GPU fit split N ways plus the all-reduces TP adds
(`cost_model.TensorParallelStepCost`: published NVLink figures, not a measurement), and a TP-N worker's
KV memory is what the real bf16 weights leave on its N GPUs (`cost_model.worker_kv_memory_gb`). Both
pools of a plan share one TP: KV moves only between engines of one layout, and the spec requires it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from control_plane.autoscaler import workers_for
from control_plane.spec import Spec, spec_from_dict
from dynamo_grpc.engine.cost_model import (
    ALLREDUCE_BUS_GBPS,
    ALLREDUCE_LATENCY_US,
    GPU_MEMORY_GB,
    KV_BYTES_PER_TOKEN,
    MODEL_SHAPES,
    StepCostModel,
    TensorParallelStepCost,
    check_tensor_parallel_size,
    load_tensor_parallel_cost,
    transfer_ms,
    worker_kv_memory_gb,
)
from dynamo_grpc.engine.registry import DEFAULT_ENGINE, engine_kind
from dynamo_grpc.fleetsim import KV_MEMORY_GB, FleetShape, kv_memory_for, run_virtual, simulate
from dynamo_grpc.loadgen import Lengths, Workload, summarize
from dynamo_grpc.slo import Objectives

BLOCK_SIZE = 16
"""KV block size of the simulated fleet; the KV-capacity estimate rounds sequences up to it."""
AGGREGATED_CHUNKS = (256, 512, 1024, 2048)
PREFILL_BUDGETS = (256, 512, 1024, 2048, 4096, 8192, 16384)
SATURATION = 0.95
"""A prefill token budget saturates the GPU when a prompt prefills within 5% of the fastest budget's time."""
REQUIRED_ATTAINMENT = 0.95
"""Share of requests that must meet both objectives for a simulated fleet to count as meeting them."""
STABLE_UTILISATION = 0.97
"""A fleet whose steady-state utilisation the cost model puts above this is unstable: a short simulation
may still pass it (the queue has not grown yet), so it is never proposed."""


StepCost = StepCostModel | TensorParallelStepCost
"""What prices a step for the estimate: the one-GPU fit, or a TP-N engine built on it."""


class PlanError(ValueError):
    """No fleet within the limits meets the objectives; the message says what bound it."""


@dataclass(frozen=True)
class PlannerWorkload:
    isl: int
    """Input (prompt) tokens per request."""
    osl: int
    """Output tokens per request."""
    rate: float
    """Poisson arrivals per second."""

    def __post_init__(self) -> None:
        if self.isl < 1 or self.osl < 1 or self.rate <= 0:
            raise ValueError("isl and osl must be at least 1 and rate must be positive")


@dataclass(frozen=True)
class Verification:
    """What a simulated fleet did with the workload."""

    shape: FleetShape
    requests: int
    seed: int
    ttft_p90_ms: float
    tpot_p90_ms: float
    attainment: float
    """Share of requests that met both objectives."""
    goodput: float
    """Requests/s meeting both objectives: attainment x the offered rate."""

    @property
    def meets(self) -> bool:
        return self.attainment >= REQUIRED_ATTAINMENT

    def describe(self) -> str:
        return (f"{self.shape.describe():<28} {self.shape.gpus:>3} GPUs  {self.requests:>4} req  TTFT p90 {self.ttft_p90_ms:7.0f} ms  "
                f"TPOT p90 {self.tpot_p90_ms:6.1f} ms  met {self.attainment:6.1%}  "
                f"{'ok' if self.meets else 'misses'}")


@dataclass(frozen=True)
class Estimate:
    """The cost model's closed-form answer for one TP, the starting point of the simulated search.

    Rates and worker counts are per worker, which is one GPU at TP 1 and N GPUs at TP N.
    """

    prefill_ms: float
    """One prompt on an idle prefill worker."""
    prefill_budget: int
    """Tokens per prefill step (`max_num_batched_tokens` of the prefill pool), from `prefill_token_budget`."""
    prefill_rps_per_gpu: float
    kv_batch_limit: int
    """Sequences whose KV (prompt and output) fits one worker's KV memory."""
    decode_batch: int
    """Largest decode batch whose step meets the ITL objective and whose KV fits."""
    decode_step_ms: float
    decode_rps_per_gpu: float
    decode_max_rps_per_gpu: float
    """Throughput at the largest batch that fits, whatever its ITL: beyond it decode queues grow."""
    prefill_workers: int
    decode_workers: int
    aggregated_rps_per_gpu: dict[int, float] = field(default_factory=dict)
    """Per chunk budget; a budget that cannot meet the objectives is left out."""
    aggregated_max_rps_per_gpu: dict[int, float] = field(default_factory=dict)
    aggregated_workers: int = 0
    """0 when no chunk budget can meet the objectives."""
    tensor_parallel_size: int = 1
    """GPUs per worker in both pools."""
    kv_memory_gb: float = KV_MEMORY_GB
    """KV memory of one worker (all of its GPUs)."""

    def describe(self) -> str:
        guess = f"first guess {self.prefill_workers}P+{self.decode_workers}D, " + (
            f"aggregated {self.aggregated_workers}" if self.aggregated_workers else "aggregated: none")
        per = "GPU" if self.tensor_parallel_size == 1 else "worker"
        return (f"prefill {self.prefill_ms:.0f} ms/prompt in steps of {self.prefill_budget} tokens -> "
                f"{self.prefill_rps_per_gpu:.2f} req/s per {per}; "
                f"decode batch {self.decode_batch} at {self.decode_step_ms:.0f} ms/step -> "
                f"{self.decode_rps_per_gpu:.2f} req/s per {per}; {guess}")


@dataclass(frozen=True)
class PoolPlan:
    model: str
    workload: PlannerWorkload
    objectives: Objectives
    chosen: Verification
    disaggregated: Verification | None
    """The cheapest disaggregated fleet that met the objectives, if any did (over every TP searched)."""
    aggregated: Verification | None
    estimates: tuple[Estimate, ...]
    """The cost model's answer for each TP that can meet the objectives, smallest TP first."""
    simulations: tuple[Verification, ...]
    notes: tuple[str, ...] = ()
    searched_aggregated: bool = True

    @property
    def shape(self) -> FleetShape:
        return self.chosen.shape

    @property
    def tensor_parallel_size(self) -> int:
        """GPUs per worker, the same in both pools."""
        return self.shape.tensor_parallel_size

    @property
    def estimate(self) -> Estimate:
        """The estimate at the chosen fleet's TP."""
        return next(e for e in self.estimates if e.tensor_parallel_size == self.tensor_parallel_size)

    @property
    def kv_memory_gb(self) -> float:
        """KV memory of one worker of the chosen fleet."""
        return self.estimate.kv_memory_gb

    @property
    def prefill_workers(self) -> int:
        return self.shape.prefill_workers

    @property
    def decode_workers(self) -> int:
        return self.shape.decode_workers

    @property
    def gpus(self) -> int:
        return self.shape.gpus

    @property
    def is_disaggregated(self) -> bool:
        return self.shape.prefill_workers > 0

    def render(self) -> str:
        w, o = self.workload, self.objectives
        tps = " or ".join(str(e.tensor_parallel_size) for e in self.estimates)
        lines = [(f"{self.model}, ISL {w.isl} / OSL {w.osl} at {w.rate:g} req/s, TTFT <= {o.ttft_ms:g} ms, "
                  f"ITL <= {o.itl_ms:g} ms (TP {tps}, simulated H100s)")]
        if len(self.estimates) == 1:
            lines.append(f"  estimate: {self.estimates[0].describe()}")
        else:
            lines += [f"  estimate TP {e.tensor_parallel_size} ({e.kv_memory_gb:.0f} GB KV/worker): {e.describe()}"
                      for e in self.estimates]
        lines.append("  simulated:")
        lines += [f"    {v.describe()}" for v in self.simulations]
        for label, best in (("disaggregated", self.disaggregated), ("aggregated", self.aggregated)):
            none = "not searched" if label == "aggregated" and not self.searched_aggregated else \
                "none met the objectives"
            lines.append(f"  cheapest {label}: " + (f"{best.shape.describe()} = {best.shape.gpus} GPUs"
                                                    if best else none))
        lines.append(f"  plan: {self.shape.describe()} = {self.gpus} GPUs")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# --- the closed-form estimate ------------------------------------------------------------------------

def _prefill_ms(cost: StepCost, tokens: int, chunk: int) -> float:
    total, done = 0.0, 0
    while done < tokens:
        step = min(chunk, tokens - done)
        total += cost.prefill_ms(step, done)
        done += step
    return total


def prefill_token_budget(cost: StepCost, isl: int) -> int:
    """The smallest step budget that saturates the GPU for this prompt length.

    Past it, a bigger step prefills no faster (attention grows with the square of the chunk) but every
    prompt batched into it waits for the whole step, so TTFT only gets worse.
    """
    times = {budget: _prefill_ms(cost, isl, budget) for budget in PREFILL_BUDGETS}
    fastest = min(times.values())
    return min(budget for budget, ms in times.items() if ms * SATURATION <= fastest)


def _kv_batch_limit(model: str, workload: PlannerWorkload, kv_memory_gb: float) -> int:
    """Sequences whose whole KV (prompt and output) fits one worker's KV memory."""
    blocks = int(kv_memory_gb * 1e9 / KV_BYTES_PER_TOKEN[model] / BLOCK_SIZE)
    return blocks // math.ceil((workload.isl + workload.osl) / BLOCK_SIZE)


def _aggregated_rates(cost: StepCost, workload: PlannerWorkload, objectives: Objectives, chunk: int,
                      max_batch: int, ttft_margin: float) -> tuple[float, float]:
    """(req/s per worker within the objectives, req/s per worker at all) for chunked prefill riding with decodes.

    With a decode batch B, each step carries up to chunk - B prompt tokens, so a prompt takes k steps
    that are slowed by the chunk, and a request's OSL / B share of the decode steps. Per request the
    worker spends k mixed steps and max(0, OSL/B - k) plain ones; their mean is the ITL a request sees.
    """
    context = workload.isl + workload.osl / 2
    best = at_all = 0.0
    for batch in range(1, max_batch + 1):
        per_step = chunk - batch
        if per_step < 1:
            break
        steps = math.ceil(workload.isl / per_step)
        mixed = cost.step_ms(min(per_step, workload.isl), workload.isl // 2, batch, int(batch * context))
        plain = cost.decode_ms(batch, int(batch * context))
        decode_steps = workload.osl / batch
        cycle_ms = steps * mixed + max(0.0, decode_steps - steps) * plain
        rate = 1000.0 / cycle_ms
        at_all = max(at_all, rate)
        mean_itl = mixed if decode_steps < steps else cycle_ms / decode_steps
        if mean_itl <= objectives.itl_ms and steps * mixed <= objectives.ttft_ms * ttft_margin:
            best = max(best, rate)
    return best, at_all


def _on(tp: int) -> str:
    return "one GPU" if tp == 1 else f"a TP-{tp} worker"


def estimate_pools(model: str, workload: PlannerWorkload, objectives: Objectives, *, link: str = "nvlink",
                   utilisation: float = 0.8, ttft_margin: float = 0.5, kv_memory_gb: float | None = None,
                   tensor_parallel_size: int = 1) -> Estimate:
    """Worker counts from the step cost model alone, with `utilisation` as the headroom left for queueing.

    A pool sized to run at `utilisation` of its capacity runs smaller batches than the capacity assumes,
    so the ITL objective is applied to the full batch without a further margin. Workers are TP
    `tensor_parallel_size` in both pools, each with `kv_memory_gb` of KV memory (by default
    `fleetsim.kv_memory_for`: 40 GB at TP 1, the real weights' leftover at TP N).

    Raises PlanError when no fleet of any size can meet the objectives (one prompt takes longer than the
    TTFT objective, or a single decode step longer than the ITL objective), or when a worker has no room
    for one request's KV.
    """
    tp = tensor_parallel_size
    cost = load_tensor_parallel_cost(model, tp)
    if kv_memory_gb is None:
        kv_memory_gb = kv_memory_for(model, tp)
    if kv_memory_gb <= 0:
        raise PlanError(f"the bf16 weights of {model} ({MODEL_SHAPES[model].weight_gb:g} GB) leave no KV memory "
                        f"on {_on(tp)} ({tp} x {GPU_MEMORY_GB:g} GB H100: {kv_memory_gb:.0f} GB left, see "
                        f"worker_kv_memory_gb)")
    prefill_budget = prefill_token_budget(cost, workload.isl)
    prefill_ms = _prefill_ms(cost, workload.isl, prefill_budget)
    context = workload.isl + workload.osl / 2
    max_batch = _kv_batch_limit(model, workload, kv_memory_gb)
    if max_batch < 1:
        raise PlanError(f"one request's KV ({workload.isl + workload.osl} tokens) does not fit the "
                        f"{kv_memory_gb:g} GB of KV memory of {_on(tp)}")
    single_step = cost.decode_ms(1, int(context))
    if single_step > objectives.itl_ms:
        raise PlanError(f"a decode step of one sequence takes {single_step:.0f} ms on {_on(tp)}, above the ITL "
                        f"objective of {objectives.itl_ms:g} ms; no number of TP-{tp} workers can meet it")
    unloaded_ttft = prefill_ms + transfer_ms(workload.isl * KV_BYTES_PER_TOKEN[model], link) + single_step
    if unloaded_ttft > objectives.ttft_ms:
        raise PlanError(f"one {workload.isl}-token prompt takes {unloaded_ttft:.0f} ms to its first token on an "
                        f"idle TP-{tp} fleet, above the TTFT objective of {objectives.ttft_ms:g} ms")
    batch = max(b for b in range(1, max_batch + 1)
                if b == 1 or cost.decode_ms(b, int(b * context)) <= objectives.itl_ms)
    step_ms = cost.decode_ms(batch, int(batch * context))
    prefill_rps = 1000.0 / prefill_ms
    decode_rps = batch / (workload.osl * step_ms / 1000.0)
    decode_max_rps = max_batch / (workload.osl * cost.decode_ms(max_batch, int(max_batch * context)) / 1000.0)
    aggregated, aggregated_max = {}, {}
    for chunk in AGGREGATED_CHUNKS:
        within, at_all = _aggregated_rates(cost, workload, objectives, chunk, max_batch, ttft_margin)
        aggregated_max[chunk] = at_all
        if within:
            aggregated[chunk] = within
    best_aggregated = max(aggregated.values(), default=0.0)
    return Estimate(
        prefill_ms=prefill_ms, prefill_budget=prefill_budget, prefill_rps_per_gpu=prefill_rps,
        kv_batch_limit=max_batch, decode_batch=batch, decode_step_ms=step_ms,
        decode_rps_per_gpu=decode_rps, decode_max_rps_per_gpu=decode_max_rps,
        prefill_workers=math.ceil(workload.rate / (prefill_rps * utilisation)),
        decode_workers=math.ceil(workload.rate / (decode_rps * utilisation)),
        aggregated_rps_per_gpu=aggregated, aggregated_max_rps_per_gpu=aggregated_max,
        aggregated_workers=math.ceil(workload.rate / (best_aggregated * utilisation)) if best_aggregated else 0,
        tensor_parallel_size=tp, kv_memory_gb=kv_memory_gb)


def _fewest_gpus(estimate: Estimate, rate: float, aggregated: bool) -> tuple[int, int]:
    """(first guess, fewest stable) GPUs of this TP's fleets, from the cost model alone.

    No fleet the cost model calls unstable is simulated, so the second bounds what the TP can cost
    before anything is simulated; the first orders the TPs' searches.
    """
    def at_least(per_worker: float) -> int:
        return max(1, workers_for(rate / (STABLE_UTILISATION * per_worker)))

    guess = estimate.prefill_workers + estimate.decode_workers
    stable = at_least(estimate.prefill_rps_per_gpu) + at_least(estimate.decode_max_rps_per_gpu)
    if aggregated and estimate.aggregated_workers:
        guess = min(guess, estimate.aggregated_workers)
        chunks = estimate.aggregated_rps_per_gpu
        stable = min([stable] + [at_least(estimate.aggregated_max_rps_per_gpu[c]) for c in chunks])
    return guess * estimate.tensor_parallel_size, stable * estimate.tensor_parallel_size


# --- the simulated search ----------------------------------------------------------------------------

def verify(model: str, workload: PlannerWorkload, objectives: Objectives, shape: FleetShape, *,
           requests: int = 200, seed: int = 1, kv_memory_gb: float | None = None) -> Verification:
    """Serve `requests` Poisson arrivals on the simulated fleet and score it against the objectives.

    `kv_memory_gb` is per worker; by default `fleetsim.kv_memory_for` the shape's TP."""
    load = Workload(requests=requests, input_tokens=Lengths(str(workload.isl)),
                    output_tokens=Lengths(str(workload.osl)), rate=workload.rate, seed=seed)
    records = run_virtual(simulate(shape, load, model=model, kv_memory_gb=kv_memory_gb))
    summary = summarize(records, objectives)
    attainment = sum(r.meets(objectives) for r in records) / len(records)
    return Verification(shape=shape, requests=requests, seed=seed, ttft_p90_ms=summary["ttft_ms"].get("p90", math.inf),
                        tpot_p90_ms=summary["tpot_ms"].get("p90", 0.0), attainment=attainment,
                        goodput=attainment * workload.rate)


def _smallest(start: int, lowest: int, highest: int, passes_short: Callable[[int], Verification | None],
              confirm: Callable[[Verification], Verification | None]) -> Verification | None:
    """The fleet at the smallest size that meets the objectives, searching from `start` down or up.

    Sizes are assumed monotone (if n GPUs meet the objectives, n + 1 do too), so the walk uses short
    runs, and only its answer gets the long run; if that fails the walk goes on upward.
    """
    if highest < lowest:
        return None
    size = min(max(start, lowest), highest)
    passing = passes_short(size)
    if passing is not None:
        while size > lowest and (smaller := passes_short(size - 1)) is not None:
            size, passing = size - 1, smaller
    while True:
        if passing is not None and (confirmed := confirm(passing)) is not None:
            return confirmed
        size += 1
        if size > highest:
            return None
        passing = passes_short(size)


def _cheapest(options: Iterable[Verification | None]) -> Verification | None:
    """Fewest GPUs; ties go to disaggregation, then to the smaller TP."""
    return min((v for v in options if v is not None), default=None,
               key=lambda v: (v.shape.gpus, v.shape.prefill_workers == 0, v.shape.tensor_parallel_size))


def _tensor_parallel_options(model: str, tps: list[int]) -> tuple[list[int], list[str]]:
    """The TPs to estimate, and a note on TP 1 where the real model's weights do not fit one GPU.

    At TP 1 a worker gets the planner's `kv_memory_gb` (the simulator's assumption); for the 70B that is
    the calibration's 70B-shaped model whose weights fit one device, which the real bf16 weights do not.
    Asked for TP 1 alone, the planner sizes that shape as it always has, and says so; asked to choose
    among TPs, it drops TP 1 rather than weigh a device that cannot exist against ones that can.
    """
    weight_gb = MODEL_SHAPES[model].weight_gb
    if 1 not in tps or worker_kv_memory_gb(model, 1) > 0:
        return tps, []
    does_not_fit = f"{weight_gb:g} GB of bf16 weights do not fit one {GPU_MEMORY_GB:g} GB H100"
    if tps == [1]:
        note = (f"TP 1 sizes the calibration's {model} shape, whose weights fit one device; the real model's "
                f"{does_not_fit} (plan with tp_options=(1, 2, 4, 8) for a fleet that can be deployed)")
        return tps, [note]
    return [tp for tp in tps if tp != 1], [f"TP 1 not searched: the real {model}'s {does_not_fit}"]


def _estimate_each_tp(model: str, workload: PlannerWorkload, objectives: Objectives, tps: list[int], *,
                      max_gpus: int, link: str, kv_memory_gb: float) -> tuple[list[Estimate], list[str]]:
    """The estimate of each TP that can meet the objectives, and why each other TP cannot.

    With a single TP to choose from, its `PlanError` is raised as it is.
    """
    estimates: list[Estimate] = []
    refused: list[str] = []
    for tp in tps:
        if tp > max_gpus:
            refused.append(f"TP {tp}: a worker needs more than the {max_gpus} GPUs allowed")
            continue
        try:
            estimates.append(estimate_pools(model, workload, objectives, link=link, tensor_parallel_size=tp,
                                            kv_memory_gb=kv_memory_gb if tp == 1 else None))
        except PlanError as error:
            if len(tps) == 1:
                raise
            refused.append(f"TP {tp}: {error}")
    return estimates, refused


def _disaggregated_shapes(estimate: Estimate, rate: float, size: int, link: str) -> list[FleetShape]:
    """The prefill/decode splits of `size` workers that the cost model calls stable, least loaded first."""
    def load(prefill: int) -> float:  # the busier pool's utilisation, as the cost model predicts it
        return max(rate / (prefill * estimate.prefill_rps_per_gpu),
                   rate / ((size - prefill) * estimate.decode_rps_per_gpu))

    stable = [p for p in range(1, size)
              if rate / (p * estimate.prefill_rps_per_gpu) <= STABLE_UTILISATION
              and rate / ((size - p) * estimate.decode_max_rps_per_gpu) <= STABLE_UTILISATION]
    tp = estimate.tensor_parallel_size
    return [FleetShape(decode_workers=size - p, prefill_workers=p, link=link,
                       prefill_chunk_tokens=estimate.prefill_budget, tensor_parallel_size=tp)
            for p in sorted(stable, key=load)]


def _aggregated_shapes(estimate: Estimate, rate: float, size: int) -> list[FleetShape]:
    """`size` aggregated workers at each chunk budget the cost model calls stable, best rate first."""
    chunks = sorted(estimate.aggregated_rps_per_gpu, key=lambda c: -estimate.aggregated_rps_per_gpu[c])
    tp = estimate.tensor_parallel_size
    return [FleetShape(decode_workers=size, decode_chunk_tokens=c, tensor_parallel_size=tp)
            for c in chunks if rate / (size * estimate.aggregated_max_rps_per_gpu[c]) <= STABLE_UTILISATION]


@dataclass
class _FleetSearch:
    """The simulated search of one plan; `plan_pools` documents the parameters.

    Every simulation goes through `check`, which runs each (fleet, run length) once, so the searches of
    several TPs and the confirming runs share results, and `simulations` lists them all.
    """

    model: str
    workload: PlannerWorkload
    objectives: Objectives
    link: str
    aggregated: bool
    requests: int
    confirm_requests: int
    seed: int
    search_span: int
    candidates_per_size: int
    kv_memory_gb: dict[int, float]
    """One worker's KV memory, per TP."""
    results: dict[tuple[FleetShape, int], Verification] = field(default_factory=dict)

    def search_each_tp(self, estimates: list[Estimate], max_gpus: int
                       ) -> tuple[list[Verification], list[str]]:
        """Every fleet found, searching the TPs cheapest first guess first, each only up to the GPUs of the
        best fleet so far; and a note for each TP whose stable fleets need more, which is not simulated."""
        found: list[Verification] = []
        notes: list[str] = []
        bounds = {e.tensor_parallel_size: _fewest_gpus(e, self.workload.rate, self.aggregated)
                  for e in estimates}
        order = sorted(estimates, key=lambda e: (bounds[e.tensor_parallel_size], e.tensor_parallel_size))
        for estimate in order:
            tp = estimate.tensor_parallel_size
            best = _cheapest(found)
            gpu_limit = max_gpus if best is None else min(max_gpus, best.shape.gpus)
            fewest = bounds[tp][1]
            if fewest > gpu_limit:
                than = f"the {best.shape.gpus} of {best.shape.describe()}" if best else f"max_gpus {max_gpus}"
                notes.append(f"TP {tp} not simulated: its stable fleets need at least {fewest} GPUs, "
                             f"more than {than}")
                continue
            found += [v for v in self.search(estimate, gpu_limit) if v is not None]
        return found, notes

    def search(self, estimate: Estimate, gpu_limit: int) -> tuple[Verification | None, Verification | None]:
        """The cheapest disaggregated and aggregated fleets of this TP with at most `gpu_limit` GPUs."""
        worker_limit = gpu_limit // estimate.tensor_parallel_size
        guess = estimate.prefill_workers + estimate.decode_workers
        disaggregated = _smallest(guess, 2, min(worker_limit, guess + self.search_span),
                                  lambda size: self.disaggregated_at(estimate, size), self.confirm)
        aggregated = None
        if self.aggregated and estimate.aggregated_workers:
            guess = estimate.aggregated_workers
            aggregated = _smallest(guess, 1, min(worker_limit, guess + self.search_span),
                                   lambda size: self.aggregated_at(estimate, size), self.confirm)
        return disaggregated, aggregated

    def disaggregated_at(self, estimate: Estimate, size: int) -> Verification | None:
        """A disaggregated fleet of `size` workers that meets the objectives in a short run, if one does."""
        return self.first_meeting(_disaggregated_shapes(estimate, self.workload.rate, size, self.link))

    def aggregated_at(self, estimate: Estimate, size: int) -> Verification | None:
        """An aggregated fleet of `size` workers that meets the objectives in a short run, if one does."""
        return self.first_meeting(_aggregated_shapes(estimate, self.workload.rate, size))

    def first_meeting(self, shapes: list[FleetShape]) -> Verification | None:
        """The first of the best `candidates_per_size` shapes that meets the objectives in a short run."""
        runs = (self.check(shape, self.requests, self.seed) for shape in shapes[:self.candidates_per_size])
        return next((v for v in runs if v.meets), None)

    def confirm(self, short: Verification) -> Verification | None:
        """The long run, with another seed, of a fleet that passed a short one, if it passes too."""
        confirmed = self.check(short.shape, self.confirm_requests, self.seed + 1)
        return confirmed if confirmed.meets else None

    def check(self, shape: FleetShape, requests: int, seed: int) -> Verification:
        """One simulated run of the fleet; a run of the same fleet and length is not repeated."""
        if (shape, requests) not in self.results:
            self.results[shape, requests] = verify(self.model, self.workload, self.objectives, shape,
                                                   requests=requests, seed=seed,
                                                   kv_memory_gb=self.kv_memory_gb[shape.tensor_parallel_size])
        return self.results[shape, requests]

    def simulations(self) -> tuple[Verification, ...]:
        """Every run, cheapest fleet first."""
        return tuple(sorted(self.results.values(), key=lambda v: (
            v.shape.gpus, v.shape.prefill_workers == 0, v.shape.tensor_parallel_size, v.shape.prefill_workers,
            v.shape.decode_chunk_tokens, v.requests)))


def plan_pools(model: str, workload: PlannerWorkload, objectives: Objectives, *, max_gpus: int = 64,
               tp_options: Iterable[int] = (1,), link: str = "nvlink", aggregated: bool = True,
               requests: int = 200, confirm_requests: int = 600, seed: int = 1, search_span: int = 4,
               candidates_per_size: int = 2, kv_memory_gb: float = KV_MEMORY_GB) -> PoolPlan:
    """The fewest simulated H100s that serve `workload` within `objectives`, disaggregated or aggregated.

    For each fleet size, from the estimate's guess, the `candidates_per_size` splits (or aggregated chunk
    budgets) the cost model rates best are simulated with `requests` arrivals; the search walks down
    while a size still meets the objectives and up (at most `search_span` sizes past the guess) until
    one does. A fleet meets them when at least 95% of its requests meet both the TTFT and the ITL
    objective, in the short run and then in a run of `confirm_requests` with another seed: a short run
    ends before a rare burst of arrivals has built the queue that a marginal fleet never drains.
    Fleets the cost model calls unstable (`STABLE_UTILISATION`) are not simulated. Ties go to
    disaggregation, then to the smaller TP.

    Each TP in `tp_options` (GPUs per worker, both pools alike) is estimated; those that can meet the
    objectives are searched cheapest first guess first, each only up to the GPUs of the best plan found
    so far, and a TP whose stable fleets already need more is not simulated at all. `max_gpus` counts
    GPUs (workers x TP); `kv_memory_gb` is a TP-1 worker's KV memory (TP N: `worker_kv_memory_gb`).
    """
    tps = sorted(set(tp_options))
    if not tps:
        raise ValueError("give at least one tensor parallel size")
    for tp in tps:
        check_tensor_parallel_size(model, tp)
    if max_gpus < 1:
        raise ValueError("max_gpus must be at least 1")
    tps, notes = _tensor_parallel_options(model, tps)
    estimates, refused = _estimate_each_tp(model, workload, objectives, tps, max_gpus=max_gpus, link=link,
                                           kv_memory_gb=kv_memory_gb)
    if not estimates:
        raise PlanError("no tensor parallel size can meet the objectives:\n  " + "\n  ".join(notes + refused))
    notes += refused
    fleets = _FleetSearch(model, workload, objectives, link=link, aggregated=aggregated, requests=requests,
                          confirm_requests=confirm_requests, seed=seed, search_span=search_span,
                          candidates_per_size=candidates_per_size,
                          kv_memory_gb={e.tensor_parallel_size: e.kv_memory_gb for e in estimates})
    found, not_simulated = fleets.search_each_tp(estimates, max_gpus)
    notes += not_simulated
    for estimate in estimates:
        tp = estimate.tensor_parallel_size
        notes.append(f"TP {tp}{' only' if len(estimates) == 1 else ''}: every worker is {'one simulated H100' if tp == 1 else f'{tp} simulated H100s'} "
                     f"with {estimate.kv_memory_gb:.0f} GB of KV memory; KV moves over {link}")
    if any(e.tensor_parallel_size > 1 for e in estimates):
        notes.append(f"TP > 1 step times are the one-GPU fit split N ways plus 2 all-reduces per layer at "
                     f"{ALLREDUCE_BUS_GBPS:g} GB/s bus bandwidth and {ALLREDUCE_LATENCY_US:g} us each: a model "
                     "from published NVLink figures, not a measurement")
    if aggregated and not any(e.aggregated_workers for e in estimates):
        notes.append("aggregated: the cost model finds no chunk budget whose mixed steps meet the objectives")
    best_disaggregated = _cheapest(v for v in found if v.shape.prefill_workers)
    best_aggregated = _cheapest(v for v in found if not v.shape.prefill_workers)
    chosen = _cheapest(found)
    simulations = fleets.simulations()
    if chosen is None:
        tried = "\n".join([f"  {v.describe()}" for v in simulations] +
                          [f"  {n}" for n in notes if " not simulated: " in n])
        raise PlanError(f"no fleet of at most {max_gpus} GPUs tried met the objectives (searched up to "
                        f"{search_span} sizes past the estimate):\n{tried}")
    return PoolPlan(model=model, workload=workload, objectives=objectives, chosen=chosen,
                    disaggregated=best_disaggregated, aggregated=best_aggregated,
                    estimates=tuple(sorted(estimates, key=lambda e: e.tensor_parallel_size)),
                    simulations=simulations, notes=tuple(notes), searched_aggregated=aggregated)


# --- the deployment spec -----------------------------------------------------------------------------

def _place_pools(prefill: int, decode: int, hosts: list[tuple[str, str, int]], tensor_parallel_size: int = 1
                 ) -> tuple[list[str], list[str]]:
    """Host lists for the two pools such that the spec's round-robin placement fits every host's GPUs.

    Both pools over every host comes first: each node then holds prefill and decode workers, so KV can
    move within a node. Otherwise prefill takes the first hosts and decode the rest, or prefill every
    host and decode the last ones. Every worker takes `tensor_parallel_size` GPUs of its host.
    """
    names = [name for name, _, gpus in hosts if gpus > 0]
    capacity = {name: gpus for name, _, gpus in hosts}

    def fits(prefill_hosts: list[str], decode_hosts: list[str]) -> bool:
        used = dict.fromkeys(capacity, 0)
        for pool_hosts, workers in ((prefill_hosts, prefill), (decode_hosts, decode)):
            for index in range(workers):
                used[pool_hosts[index % len(pool_hosts)]] += tensor_parallel_size
        return all(used[name] <= capacity[name] for name in used)

    # Workers of several GPUs fill hosts unevenly: decode then starts from the last host, where the
    # prefill round-robin left room, or takes the last hosts alone.
    layouts = ([(names, names), (names, names[::-1])] + [(names[:k], names[k:]) for k in range(1, len(names))]
               + [(names, names[k:][::-1]) for k in range(1, len(names))])
    for prefill_hosts, decode_hosts in layouts:
        if fits(prefill_hosts, decode_hosts):
            return prefill_hosts, decode_hosts
    per = "GPUs" if tensor_parallel_size == 1 else f"workers of {tensor_parallel_size} GPUs each"
    raise ValueError(f"the plan needs {prefill} prefill + {decode} decode {per}, which the hosts "
                     f"({', '.join(f'{n}: {g}' for n, _, g in hosts)}) cannot hold")


def pool_plan_to_spec(plan: PoolPlan, *, model_path: str, served_name: str,
                      hosts: list[tuple[str, str, int]], etcd: str | list[str], name: str = "planned",
                      engine: str = DEFAULT_ENGINE) -> Spec:
    """A deployment spec for the plan, checked by the spec parser; an aggregated plan has no prefill workers.

    `hosts` are (name, address, gpus). With engine "simulated" the workers run the calibrated cost model
    of the plan's model, so the planned fleet can be tried without GPUs.
    """
    if not hosts:
        raise ValueError("give at least one host")
    prefill_hosts, decode_hosts = _place_pools(plan.prefill_workers, plan.decode_workers, list(hosts),
                                               plan.tensor_parallel_size)
    context = plan.workload.isl + plan.workload.osl
    model_args: dict[str, object] = {"max_model_len": math.ceil(context / 1024) * 1024}
    # The simulated decode workers batched as many sequences as their KV memory held; so may these.
    decode_args: dict[str, object] = {"max_num_batched_tokens": plan.shape.decode_chunk_tokens}
    engine_model_args, engine_decode_args = engine_kind(engine).plan_args(
        plan.model, plan.kv_memory_gb, plan.estimate.kv_batch_limit, BLOCK_SIZE)
    model_args.update(engine_model_args)
    decode_args.update(engine_decode_args)
    data = {
        "name": name,
        "model": {"path": model_path, "served_name": served_name, "engine": engine, "engine_args": model_args},
        "hosts": [{"name": h, "address": a, "gpus": g} for h, a, g in hosts],
        "prefill": {"workers": plan.prefill_workers, "tensor_parallel_size": plan.tensor_parallel_size,
                    "hosts": prefill_hosts or decode_hosts, "engine_args": {
                        "max_num_batched_tokens": plan.shape.prefill_chunk_tokens} if plan.prefill_workers else {}},
        "decode": {"workers": plan.decode_workers, "tensor_parallel_size": plan.tensor_parallel_size,
                   "hosts": decode_hosts, "engine_args": decode_args},
        # The simulated fleet routed least-loaded, which kv_aware matches for prompts sharing no prefix.
        "router": {"policy": "kv_aware"},
        "slo": {"ttft_ms": plan.objectives.ttft_ms, "itl_ms": plan.objectives.itl_ms},
        "etcd": [etcd] if isinstance(etcd, str) else list(etcd),
    }
    return spec_from_dict(data, source="<planner>")
