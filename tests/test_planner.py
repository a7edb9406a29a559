"""The SLA planner: offline pool sizes that meet the objectives with the fewest GPUs."""

from __future__ import annotations

import dataclasses

import pytest

from control_plane.compiler import compile_spec
from control_plane.planner import (
    AGGREGATED_CHUNKS,
    STABLE_UTILISATION,
    PlanError,
    PlannerWorkload,
    PoolPlan,
    _aggregated_shapes,
    _disaggregated_shapes,
    _prefill_ms,
    estimate_pools,
    plan_pools,
    pool_plan_to_spec,
    prefill_token_budget,
    verify,
)
from control_plane.spec import dump_spec, parse_spec
from dynamo_grpc.engine.cost_model import load_cost_model
from dynamo_grpc.fleetsim import FleetShape
from dynamo_grpc.slo import Objectives

MODEL = "llama3_70b"
OBJECTIVES = Objectives(ttft_ms=2000, itl_ms=100)
# Short runs keep the module to seconds of CPU; the planner's own defaults are longer.
RUNS = {"requests": 150, "confirm_requests": 300}


@pytest.fixture(scope="module")
def plan_at_4() -> PoolPlan:
    return plan_pools(MODEL, PlannerWorkload(3000, 150, 4.0), OBJECTIVES, **RUNS)


@pytest.fixture(scope="module")
def plan_at_8() -> PoolPlan:
    return plan_pools(MODEL, PlannerWorkload(3000, 150, 8.0), OBJECTIVES, aggregated=False, **RUNS)


def test_the_disaggregated_answer_meets_the_objectives_and_is_minimal_in_its_bottleneck_pool(
        plan_at_4: PoolPlan) -> None:
    answer = plan_at_4.disaggregated
    assert answer is not None
    workload = plan_at_4.workload
    again = verify(MODEL, workload, OBJECTIVES, answer.shape, requests=300, seed=7)
    assert again.goodput >= 0.95 * workload.rate, again.describe()
    estimate = plan_at_4.estimate
    prefill_load = workload.rate / (answer.shape.prefill_workers * estimate.prefill_rps_per_gpu)
    decode_load = workload.rate / (answer.shape.decode_workers * estimate.decode_rps_per_gpu)
    smaller = (dataclasses.replace(answer.shape, prefill_workers=answer.shape.prefill_workers - 1)
               if prefill_load >= decode_load else
               dataclasses.replace(answer.shape, decode_workers=answer.shape.decode_workers - 1))
    fewer = verify(MODEL, workload, OBJECTIVES, smaller, requests=300, seed=7)
    assert fewer.goodput < 0.95 * workload.rate, fewer.describe()


def test_the_plan_takes_the_cheaper_of_aggregated_and_disaggregated(plan_at_4: PoolPlan) -> None:
    options = [v for v in (plan_at_4.aggregated, plan_at_4.disaggregated) if v is not None]
    assert plan_at_4.gpus == min(v.shape.gpus for v in options)
    assert plan_at_4.chosen.meets and plan_at_4.chosen.requests == RUNS["confirm_requests"]
    assert "plan:" in plan_at_4.render()


def test_a_higher_rate_needs_more_gpus(plan_at_4: PoolPlan, plan_at_8: PoolPlan) -> None:
    assert plan_at_4.disaggregated is not None
    assert plan_at_8.gpus > plan_at_4.disaggregated.shape.gpus
    assert plan_at_8.prefill_workers >= plan_at_4.disaggregated.shape.prefill_workers


def test_a_stricter_itl_objective_moves_the_choice_to_disaggregation(plan_at_4: PoolPlan) -> None:
    # At ITL 100 ms a 256-token prefill chunk riding with the decodes costs them little: aggregation
    # needs fewer GPUs (its worker also prefills, so no prefill pool sits half idle).
    assert plan_at_4.aggregated is not None and plan_at_4.disaggregated is not None
    assert not plan_at_4.is_disaggregated
    assert plan_at_4.aggregated.shape.gpus < plan_at_4.disaggregated.shape.gpus
    # At 60 ms the chunks' slowdown of the decode steps (the floor is ~52 ms at batch 1) costs aggregation
    # more GPUs than disaggregation needs.
    strict = plan_pools(MODEL, PlannerWorkload(3000, 150, 4.0), Objectives(ttft_ms=2000, itl_ms=60), **RUNS)
    assert strict.is_disaggregated and strict.chosen.tpot_p90_ms <= 60
    assert strict.aggregated is None or strict.aggregated.shape.gpus > strict.gpus


def test_unreachable_objectives_and_unpriceable_tensor_parallelism_are_refused() -> None:
    with pytest.raises(PlanError, match="decode step"):
        estimate_pools(MODEL, PlannerWorkload(3000, 150, 1.0), Objectives(ttft_ms=2000, itl_ms=30))
    with pytest.raises(PlanError, match="first token"):
        estimate_pools(MODEL, PlannerWorkload(3000, 150, 1.0), Objectives(ttft_ms=300, itl_ms=100))
    # TP 1 alone keeps refusing an ITL below its decode floor, as before TP was modelled.
    with pytest.raises(PlanError, match="decode step"):
        plan_pools(MODEL, PlannerWorkload(3000, 150, 1.0), Objectives(ttft_ms=2000, itl_ms=30))
    # The real 70B's bf16 weights leave no KV memory on two GPUs.
    with pytest.raises(PlanError, match="leave no KV memory on a TP-2 worker"):
        estimate_pools(MODEL, PlannerWorkload(3000, 150, 1.0), OBJECTIVES, tensor_parallel_size=2)
    # The KV heads (8) must split evenly: TP 3 and TP 16 cannot be priced.
    for tp in (3, 16):
        with pytest.raises(ValueError, match="KV heads"):
            plan_pools(MODEL, PlannerWorkload(3000, 150, 1.0), OBJECTIVES, tp_options=(1, tp))
    # Even TP 8 cannot decode one sequence in 5 ms: the message names every TP's reason.
    with pytest.raises(PlanError, match=r"(?s)TP 1 not searched.*TP 2: .*TP 4: a decode step.*TP 8: a decode step"):
        plan_pools(MODEL, PlannerWorkload(3000, 150, 1.0), Objectives(ttft_ms=2000, itl_ms=5), tp_options=(1, 2, 4, 8))


def test_a_plan_becomes_a_spec_that_round_trips_and_compiles(plan_at_8: PoolPlan) -> None:
    hosts = [("node-a", "10.0.0.1", 8), ("node-b", "10.0.0.2", 8)]
    spec = pool_plan_to_spec(plan_at_8, model_path="/models/llama-3-70b", served_name="llama-3-70b",
                             hosts=hosts, etcd="10.0.0.1:2379")
    assert (spec.prefill.workers, spec.decode.workers) == (plan_at_8.prefill_workers, plan_at_8.decode_workers)
    # The prefill pool's step budget is the plan's: the one its simulation was verified with.
    budget = plan_at_8.estimate.prefill_budget
    assert spec.prefill.engine_args["max_num_batched_tokens"] == budget == plan_at_8.shape.prefill_chunk_tokens
    assert parse_spec(dump_spec(spec)) == spec
    compiled = compile_spec(spec)
    assert compiled is not None
    with pytest.raises(ValueError, match="cannot hold"):
        pool_plan_to_spec(plan_at_8, model_path="/m", served_name="m", hosts=[("node-a", "10.0.0.1", 4)],
                          etcd="10.0.0.1:2379")


@pytest.mark.parametrize(("model", "isl"), [("llama3_8b", 3000), ("llama3_70b", 3000), ("llama3_70b", 300)])
def test_the_prefill_budget_is_the_smallest_that_saturates_the_gpu(model: str, isl: int) -> None:
    cost = load_cost_model(model)
    budget = prefill_token_budget(cost, isl)
    fastest = min(_prefill_ms(cost, isl, b) for b in (256, 512, 1024, 2048, 4096, 8192, 16384))
    assert _prefill_ms(cost, isl, budget) <= fastest / 0.95
    assert budget == 256 or _prefill_ms(cost, isl, budget // 2) > fastest / 0.95
    assert budget < 8192  # the flat 8192 this replaces was past saturation for these prompts


def test_the_fleets_simulated_at_a_size_are_the_stable_ones_least_loaded_first() -> None:
    rate = 8.0
    estimate = estimate_pools(MODEL, PlannerWorkload(3000, 150, rate), OBJECTIVES)

    def load(workers: int, per_worker: float) -> float:
        return rate / (workers * per_worker)

    def busier(prefill: int, size: int, decode_per_worker: float) -> float:
        return max(load(prefill, estimate.prefill_rps_per_gpu), load(size - prefill, decode_per_worker))

    size = 12
    chosen = [s.prefill_workers for s in _disaggregated_shapes(estimate, rate, size, "nvlink")]
    assert len(chosen) > 1
    for prefill in range(1, size):
        stable = busier(prefill, size, estimate.decode_max_rps_per_gpu) <= STABLE_UTILISATION
        assert (prefill in chosen) == stable
    loads = [busier(prefill, size, estimate.decode_rps_per_gpu) for prefill in chosen]
    assert loads == sorted(loads) and chosen != sorted(chosen)
    assert _disaggregated_shapes(estimate, rate, 6, "nvlink") == []  # 6 GPUs cannot carry 8 req/s

    size = 8
    chunks = [s.decode_chunk_tokens for s in _aggregated_shapes(estimate, rate, size)]
    for chunk in estimate.aggregated_rps_per_gpu:  # the budgets that can meet the objectives
        stable = load(size, estimate.aggregated_max_rps_per_gpu[chunk]) <= STABLE_UTILISATION
        assert (chunk in chunks) == stable
    assert len(chunks) > 1 and len(chunks) < len(estimate.aggregated_rps_per_gpu)
    rates = [estimate.aggregated_rps_per_gpu[c] for c in chunks]
    assert rates == sorted(rates, reverse=True)


def test_an_aggregated_plan_becomes_a_spec_without_prefill_workers(plan_at_4: PoolPlan) -> None:
    assert not plan_at_4.is_disaggregated
    spec = pool_plan_to_spec(plan_at_4, model_path="/m", served_name="m", hosts=[("a", "10.0.0.1", 8)],
                             etcd="e:2379", engine="simulated")
    assert (spec.prefill.workers, spec.decode.workers) == (0, plan_at_4.decode_workers)
    assert spec.decode.engine_args["max_num_batched_tokens"] == plan_at_4.shape.decode_chunk_tokens
    compiled = compile_spec(parse_spec(dump_spec(spec)))
    assert [p.role for p in compiled.workers] == ["decode"] * plan_at_4.decode_workers
    assert compiled.pairings == ()
    as_disaggregated = dataclasses.replace(plan_at_4, chosen=plan_at_4.disaggregated)
    spec = pool_plan_to_spec(as_disaggregated, model_path="/m", served_name="m", hosts=[("a", "10.0.0.1", 8)],
                             etcd="e:2379", engine="simulated")
    assert spec.model.engine_args["cost_model"] == MODEL


# --- tensor parallelism --------------------------------------------------------------------------------

TIGHT_ITL = Objectives(ttft_ms=2000, itl_ms=30)
"""Below the ~52 ms decode floor of the 70B on one GPU: only TP > 1 can meet it."""


@pytest.fixture(scope="module")
def tp_plan() -> PoolPlan:
    return plan_pools(MODEL, PlannerWorkload(3000, 150, 4.0), TIGHT_ITL, tp_options=(1, 2, 4, 8),
                      aggregated=False, **RUNS)


def test_an_itl_below_the_one_gpu_decode_floor_gets_a_tensor_parallel_plan(tp_plan: PoolPlan) -> None:
    assert tp_plan.tensor_parallel_size in (4, 8)
    assert tp_plan.chosen.meets and tp_plan.chosen.tpot_p90_ms <= TIGHT_ITL.itl_ms
    assert tp_plan.chosen.requests == RUNS["confirm_requests"]
    # GPUs are workers x TP, in both pools alike.
    workers = tp_plan.prefill_workers + tp_plan.decode_workers
    assert tp_plan.gpus == tp_plan.shape.gpus == workers * tp_plan.tensor_parallel_size
    assert tp_plan.estimate.tensor_parallel_size == tp_plan.tensor_parallel_size
    # TP 1 cannot hold the real weights and TP 2 leaves no KV memory: both are reported, not planned.
    assert any(n.startswith("TP 1 not searched") for n in tp_plan.notes)
    assert any(n.startswith("TP 2: the bf16 weights") for n in tp_plan.notes)
    assert {e.tensor_parallel_size for e in tp_plan.estimates} == {4, 8}
    assert all(v.shape.tensor_parallel_size in (4, 8) for v in tp_plan.simulations)
    rendered = tp_plan.render()
    assert f"x TP{tp_plan.tensor_parallel_size}" in rendered and "estimate TP 4" in rendered


def smaller_fleets(plan: PoolPlan) -> list[FleetShape]:
    """Every fleet with fewer GPUs than `plan`, at each TP the planner estimated: each split of its workers
    into a prefill and a decode pool, and the aggregated fleet (no prefill pool) at each chunk budget."""
    fleets = []
    for estimate in plan.estimates:
        tp = estimate.tensor_parallel_size
        for workers in range(1, (plan.gpus - 1) // tp + 1):
            fleets += [FleetShape(decode_workers=workers - prefill, prefill_workers=prefill,
                                  prefill_chunk_tokens=estimate.prefill_budget, link=plan.shape.link,
                                  tensor_parallel_size=tp)
                       for prefill in range(1, workers)]
            fleets += [FleetShape(decode_workers=workers, decode_chunk_tokens=chunk, tensor_parallel_size=tp)
                       for chunk in AGGREGATED_CHUNKS]
    return fleets


def test_the_tensor_parallel_plan_is_the_fewest_gpus_any_tp_verified(tp_plan: PoolPlan) -> None:
    confirmed = [v for v in tp_plan.simulations if v.meets and v.requests == RUNS["confirm_requests"]]
    assert tp_plan.gpus == min(v.shape.gpus for v in confirmed)
    # Every fleet of fewer GPUs at a TP that can meet the objectives misses them, so the plan is minimal.
    smaller = smaller_fleets(tp_plan)
    assert smaller, "the plan should have smaller fleets to compare with"
    for shape in smaller:
        fewer = verify(MODEL, tp_plan.workload, TIGHT_ITL, shape, requests=RUNS["requests"], seed=7)
        assert not fewer.meets, fewer.describe()
    # Every TP the planner estimated but did not simulate (TP 8 here) was bounded above the plan by the
    # cost model.
    simulated = {v.shape.tensor_parallel_size for v in tp_plan.simulations}
    skipped = [e.tensor_parallel_size for e in tp_plan.estimates if e.tensor_parallel_size not in simulated]
    assert skipped
    for tp in skipped:
        assert any(n.startswith(f"TP {tp} not simulated") for n in tp_plan.notes)


@pytest.mark.parametrize("engine", ["vllm", "simulated"])
def test_a_tensor_parallel_plan_becomes_a_spec_with_its_tp_that_compiles(tp_plan: PoolPlan, engine: str) -> None:
    tp = tp_plan.tensor_parallel_size
    hosts = [(f"node-{i}", f"10.0.0.{i + 1}", 8) for i in range(-(-tp_plan.gpus // 8))]
    spec = pool_plan_to_spec(tp_plan, model_path="/models/llama-3-70b", served_name="llama-3-70b", hosts=hosts,
                             etcd="10.0.0.1:2379", engine=engine)
    assert spec.prefill.tensor_parallel_size == spec.decode.tensor_parallel_size == tp
    assert (spec.prefill.workers, spec.decode.workers) == (tp_plan.prefill_workers, tp_plan.decode_workers)
    compiled = compile_spec(parse_spec(dump_spec(spec)))
    assert [len(p.devices) for p in compiled.workers] == [tp] * (tp_plan.prefill_workers + tp_plan.decode_workers)
    assert all(p.tensor_parallel_size == tp for p in compiled.workers)
    if engine == "simulated":
        # The simulated workers get the KV blocks of a TP-N worker, not of one GPU.
        blocks = spec.model.engine_args["num_blocks"]
        assert blocks * 16 * 327680 == pytest.approx(tp_plan.kv_memory_gb * 1e9, rel=1e-3)
        assert tp_plan.kv_memory_gb > 2 * 40
    # A host too small for the workers' GPUs is refused.
    with pytest.raises(ValueError, match=f"workers of {tp} GPUs each, which the hosts"):
        pool_plan_to_spec(tp_plan, model_path="/m", served_name="m", hosts=[("node-a", "10.0.0.1", tp)],
                          etcd="10.0.0.1:2379")


def test_tp_one_alone_still_plans_the_calibrated_70b_shape_and_says_it_is_not_the_real_model(
        plan_at_4: PoolPlan) -> None:
    assert plan_at_4.tensor_parallel_size == 1 and plan_at_4.kv_memory_gb == 40
    assert any("whose weights fit one device" in n for n in plan_at_4.notes)
