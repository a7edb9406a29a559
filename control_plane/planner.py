"""Size the prefill and decode pools for a workload and its latency objectives, offline.

Offline, `plan_pools` picks the fewest GPUs that meet a TTFT and an ITL objective at a given arrival
rate. The calibrated step cost model gives a first guess in microseconds; the guess is then checked,
and corrected, by serving the workload on a simulated fleet (`dynamo_grpc.fleetsim`), because queueing,
batch fluctuation and prefill/decode interference are what decide the answer near the objectives and
closed-form estimates get them only roughly right. `pool_plan_to_spec` turns the answer into a
deployment spec that `dynamo-grpc compile` accepts.

Online sizing (a live fleet's metrics to pool sizes) is `control_plane.autoscaler`.

Only tensor parallel 1 is modelled: the cost model is fitted to single-GPU step times, so a plan for
TP 2 or more would be a guess presented as a measurement, and `plan_pools` refuses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from control_plane.spec import Spec, spec_from_dict
from dynamo_grpc.engine.cost_model import KV_BYTES_PER_TOKEN, StepCostModel, load_cost_model, transfer_ms
from dynamo_grpc.fleetsim import KV_MEMORY_GB, FleetShape, run_virtual, simulate
from dynamo_grpc.loadgen import Lengths, Objectives, Workload, summarize

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
    """The cost model's closed-form answer, the starting point of the simulated search."""

    prefill_ms: float
    """One prompt on an idle prefill worker."""
    prefill_budget: int
    """Tokens per prefill step (`max_num_batched_tokens` of the prefill pool), from `prefill_token_budget`."""
    prefill_rps_per_gpu: float
    kv_batch_limit: int
    """Sequences whose KV (prompt and output) fits one GPU's KV memory."""
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


@dataclass(frozen=True)
class PoolPlan:
    model: str
    workload: PlannerWorkload
    objectives: Objectives
    chosen: Verification
    disaggregated: Verification | None
    """The cheapest disaggregated fleet that met the objectives, if any did."""
    aggregated: Verification | None
    estimate: Estimate
    simulations: tuple[Verification, ...]
    notes: tuple[str, ...] = ()
    tensor_parallel_size: int = 1
    kv_memory_gb: float = KV_MEMORY_GB
    searched_aggregated: bool = True

    @property
    def shape(self) -> FleetShape:
        return self.chosen.shape

    @property
    def prefill_workers(self) -> int:
        return self.shape.prefill_workers

    @property
    def decode_workers(self) -> int:
        return self.shape.decode_workers

    @property
    def gpus(self) -> int:
        return self.shape.gpus * self.tensor_parallel_size

    @property
    def is_disaggregated(self) -> bool:
        return self.shape.prefill_workers > 0

    def render(self) -> str:
        w, o, e = self.workload, self.objectives, self.estimate
        guess = f"first guess {e.prefill_workers}P+{e.decode_workers}D, " + (
            f"aggregated {e.aggregated_workers}" if e.aggregated_workers else "aggregated: none")
        lines = [(f"{self.model}, ISL {w.isl} / OSL {w.osl} at {w.rate:g} req/s, TTFT <= {o.ttft_ms:g} ms, "
                  f"ITL <= {o.itl_ms:g} ms (TP {self.tensor_parallel_size}, simulated H100s)"),
                 (f"  estimate: prefill {e.prefill_ms:.0f} ms/prompt in steps of {e.prefill_budget} tokens -> "
                  f"{e.prefill_rps_per_gpu:.2f} req/s per GPU; "
                  f"decode batch {e.decode_batch} at {e.decode_step_ms:.0f} ms/step -> "
                  f"{e.decode_rps_per_gpu:.2f} req/s per GPU; {guess}"),
                 "  simulated:"]
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

def _prefill_ms(cost: StepCostModel, tokens: int, chunk: int) -> float:
    total, done = 0.0, 0
    while done < tokens:
        step = min(chunk, tokens - done)
        total += cost.prefill_ms(step, done)
        done += step
    return total


def prefill_token_budget(cost: StepCostModel, isl: int) -> int:
    """The smallest step budget that saturates the GPU for this prompt length.

    Past it, a bigger step prefills no faster (attention grows with the square of the chunk) but every
    prompt batched into it waits for the whole step, so TTFT only gets worse.
    """
    times = {budget: _prefill_ms(cost, isl, budget) for budget in PREFILL_BUDGETS}
    fastest = min(times.values())
    return min(budget for budget, ms in times.items() if ms * SATURATION <= fastest)


def _kv_batch_limit(model: str, workload: PlannerWorkload, kv_memory_gb: float) -> int:
    """Sequences whose whole KV (prompt and output) fits one GPU's KV memory."""
    blocks = int(kv_memory_gb * 1e9 / KV_BYTES_PER_TOKEN[model] / BLOCK_SIZE)
    return blocks // math.ceil((workload.isl + workload.osl) / BLOCK_SIZE)


def _aggregated_rates(cost: StepCostModel, workload: PlannerWorkload, objectives: Objectives, chunk: int,
                      max_batch: int, ttft_margin: float) -> tuple[float, float]:
    """(req/s per GPU within the objectives, req/s per GPU at all) for chunked prefill riding with decodes.

    With a decode batch B, each step carries up to chunk - B prompt tokens, so a prompt takes k steps
    that are slowed by the chunk, and a request's OSL / B share of the decode steps. Per request the
    GPU spends k mixed steps and max(0, OSL/B - k) plain ones; their mean is the ITL a request sees.
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


def estimate_pools(model: str, workload: PlannerWorkload, objectives: Objectives, *, link: str = "nvlink",
                   utilisation: float = 0.8, ttft_margin: float = 0.5,
                   kv_memory_gb: float = KV_MEMORY_GB) -> Estimate:
    """Worker counts from the step cost model alone, with `utilisation` as the headroom left for queueing.

    A pool sized to run at `utilisation` of its capacity runs smaller batches than the capacity assumes,
    so the ITL objective is applied to the full batch without a further margin.

    Raises PlanError when no fleet of any size can meet the objectives (one prompt takes longer than the
    TTFT objective, or a single decode step longer than the ITL objective).
    """
    cost = load_cost_model(model)
    prefill_budget = prefill_token_budget(cost, workload.isl)
    prefill_ms = _prefill_ms(cost, workload.isl, prefill_budget)
    context = workload.isl + workload.osl / 2
    max_batch = _kv_batch_limit(model, workload, kv_memory_gb)
    if max_batch < 1:
        raise PlanError(f"one request's KV ({workload.isl + workload.osl} tokens) does not fit the "
                        f"{kv_memory_gb:g} GB of KV memory of a GPU")
    single_step = cost.decode_ms(1, int(context))
    if single_step > objectives.itl_ms:
        raise PlanError(f"a decode step of one sequence takes {single_step:.0f} ms on one GPU, above the ITL "
                        f"objective of {objectives.itl_ms:g} ms; no number of TP-1 workers can meet it")
    unloaded_ttft = prefill_ms + transfer_ms(workload.isl * KV_BYTES_PER_TOKEN[model], link) + single_step
    if unloaded_ttft > objectives.ttft_ms:
        raise PlanError(f"one {workload.isl}-token prompt takes {unloaded_ttft:.0f} ms to its first token on an "
                        f"idle TP-1 fleet, above the TTFT objective of {objectives.ttft_ms:g} ms")
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
        aggregated_workers=math.ceil(workload.rate / (best_aggregated * utilisation)) if best_aggregated else 0)


# --- the simulated search ----------------------------------------------------------------------------

def verify(model: str, workload: PlannerWorkload, objectives: Objectives, shape: FleetShape, *,
           requests: int = 200, seed: int = 1, kv_memory_gb: float = KV_MEMORY_GB) -> Verification:
    """Serve `requests` Poisson arrivals on the simulated fleet and score it against the objectives."""
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
    disaggregation.
    """
    tp = sorted(set(tp_options))
    if tp != [1]:
        raise ValueError(f"tensor parallel sizes {tp} requested, but only TP 1 is modelled: the step cost model "
                         "is fitted to single-GPU H100 step times and has no term for TP communication; "
                         "plan with tp_options=(1,) and treat larger TP as a separate measurement")
    if max_gpus < 1:
        raise ValueError("max_gpus must be at least 1")
    estimate = estimate_pools(model, workload, objectives, link=link, kv_memory_gb=kv_memory_gb)
    results: dict[tuple[FleetShape, int], Verification] = {}

    def check(shape: FleetShape, count: int, run_seed: int) -> Verification:
        if (shape, count) not in results:
            results[shape, count] = verify(model, workload, objectives, shape, requests=count, seed=run_seed,
                                           kv_memory_gb=kv_memory_gb)
        return results[shape, count]

    def first_meeting(shapes: list[FleetShape]) -> Verification | None:
        return next((v for v in (check(s, requests, seed) for s in shapes[:candidates_per_size]) if v.meets), None)

    def confirm(short: Verification) -> Verification | None:
        confirmed = check(short.shape, confirm_requests, seed + 1)
        return confirmed if confirmed.meets else None

    def disaggregated_at(size: int) -> Verification | None:
        def load(prefill: int) -> float:  # the busier pool's utilisation, as the cost model predicts it
            return max(workload.rate / (prefill * estimate.prefill_rps_per_gpu),
                       workload.rate / ((size - prefill) * estimate.decode_rps_per_gpu))

        stable = [p for p in range(1, size)
                  if workload.rate / (p * estimate.prefill_rps_per_gpu) <= STABLE_UTILISATION
                  and workload.rate / ((size - p) * estimate.decode_max_rps_per_gpu) <= STABLE_UTILISATION]
        return first_meeting([FleetShape(decode_workers=size - p, prefill_workers=p, link=link,
                                         prefill_chunk_tokens=estimate.prefill_budget)
                            for p in sorted(stable, key=load)])

    def aggregated_at(size: int) -> Verification | None:
        chunks = sorted(estimate.aggregated_rps_per_gpu, key=lambda c: -estimate.aggregated_rps_per_gpu[c])
        stable = [c for c in chunks
                  if workload.rate / (size * estimate.aggregated_max_rps_per_gpu[c]) <= STABLE_UTILISATION]
        return first_meeting([FleetShape(decode_workers=size, decode_chunk_tokens=c) for c in stable])

    notes = [(f"TP 1 only: every worker is one simulated H100 with {kv_memory_gb:g} GB of KV memory; "
              f"KV moves over {link}")]
    guess = estimate.prefill_workers + estimate.decode_workers
    best_disaggregated = None
    if max_gpus >= 2:
        best_disaggregated = _smallest(guess, 2, min(max_gpus, guess + search_span), disaggregated_at, confirm)
    best_aggregated = None
    if aggregated and estimate.aggregated_workers:
        guess = estimate.aggregated_workers
        best_aggregated = _smallest(guess, 1, min(max_gpus, guess + search_span), aggregated_at, confirm)
    elif aggregated:
        notes.append("aggregated: the cost model finds no chunk budget whose mixed steps meet the objectives")
    options = [v for v in (best_disaggregated, best_aggregated) if v is not None]
    simulations = tuple(sorted(results.values(), key=lambda v: (v.shape.gpus, v.shape.prefill_workers == 0,
                                                                v.shape.prefill_workers, v.shape.decode_chunk_tokens,
                                                                v.requests)))
    if not options:
        tried = "\n".join(f"  {v.describe()}" for v in simulations)
        raise PlanError(f"no fleet of at most {max_gpus} GPUs tried met the objectives (searched up to "
                        f"{search_span} sizes past the estimate):\n{tried}")
    chosen = min(options, key=lambda v: (v.shape.gpus, v.shape.prefill_workers == 0))
    return PoolPlan(model=model, workload=workload, objectives=objectives, chosen=chosen,
                    disaggregated=best_disaggregated, aggregated=best_aggregated, estimate=estimate,
                    simulations=simulations, notes=tuple(notes), kv_memory_gb=kv_memory_gb,
                    searched_aggregated=aggregated)


# --- the deployment spec -----------------------------------------------------------------------------

def _place_pools(prefill: int, decode: int, hosts: list[tuple[str, str, int]]
                 ) -> tuple[list[str], list[str]]:
    """Host lists for the two pools such that the spec's round-robin placement fits every host's GPUs.

    Both pools over every host comes first: each node then holds prefill and decode workers, so KV can
    move within a node. Otherwise prefill takes the first hosts and decode the rest.
    """
    names = [name for name, _, gpus in hosts if gpus > 0]
    capacity = {name: gpus for name, _, gpus in hosts}

    def fits(prefill_hosts: list[str], decode_hosts: list[str]) -> bool:
        used = dict.fromkeys(capacity, 0)
        for pool_hosts, workers in ((prefill_hosts, prefill), (decode_hosts, decode)):
            for index in range(workers):
                used[pool_hosts[index % len(pool_hosts)]] += 1
        return all(used[name] <= capacity[name] for name in used)

    layouts = [(names, names)] + [(names[:k], names[k:]) for k in range(1, len(names))]
    for prefill_hosts, decode_hosts in layouts:
        if fits(prefill_hosts, decode_hosts):
            return prefill_hosts, decode_hosts
    raise ValueError(f"the plan needs {prefill} prefill + {decode} decode GPUs, which the hosts "
                     f"({', '.join(f'{n}: {g}' for n, _, g in hosts)}) cannot hold")


def pool_plan_to_spec(plan: PoolPlan, *, model_path: str, served_name: str,
                      hosts: list[tuple[str, str, int]], etcd: str | list[str], name: str = "planned",
                      engine: str = "vllm") -> Spec:
    """A deployment spec for the plan, checked by the spec parser; an aggregated plan has no prefill workers.

    `hosts` are (name, address, gpus). With engine "simulated" the workers run the calibrated cost model
    of the plan's model, so the planned fleet can be tried without GPUs.
    """
    if not hosts:
        raise ValueError("give at least one host")
    prefill_hosts, decode_hosts = _place_pools(plan.prefill_workers, plan.decode_workers, list(hosts))
    context = plan.workload.isl + plan.workload.osl
    model_args: dict[str, object] = {"max_model_len": math.ceil(context / 1024) * 1024}
    # The simulated decode workers batched as many sequences as their KV memory held; so may these.
    decode_args: dict[str, object] = {"max_num_batched_tokens": plan.shape.decode_chunk_tokens}
    if engine == "vllm":
        model_args["dtype"] = "bfloat16"  # what the calibration measured
        decode_args["max_num_seqs"] = plan.estimate.kv_batch_limit
    elif engine == "simulated":
        model_args.update(cost_model=plan.model, block_size=BLOCK_SIZE, num_blocks=int(
            plan.kv_memory_gb * 1e9 / KV_BYTES_PER_TOKEN[plan.model] / BLOCK_SIZE))
        decode_args["max_batch_size"] = plan.estimate.kv_batch_limit
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
