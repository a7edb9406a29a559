"""The step cost model reproduces the packaged H100 measurements and behaves like a GPU step."""

from __future__ import annotations

import json
import re
from itertools import pairwise

import pytest

from dynamo_grpc.engine.cost_model import (
    GRID_FILE,
    KV_BYTES_PER_TOKEN,
    SHAPES,
    STEP_TIMES_FILE,
    TRANSPORT_GBPS,
    StepCostModel,
    load_cost_model,
    load_tensor_parallel_cost,
    transfer_ms,
    worker_kv_memory_gb,
)
from dynamo_grpc.fleetsim import KV_MEMORY_GB

TOLERANCE = 0.10


def measured_points(path, shape):
    """(kind and key, prefill tokens, decode batch, context per decode, ms), parsed here, not by the model."""
    data = json.loads(path.read_text())[shape]
    points = [(f"prefill P{p}", int(p), 0, 0, ms) for p, ms in data["prefill"].items()]
    for key, ms in data["decode"].items():
        batch, context = map(int, re.fullmatch(r"B(\d+)_C(\d+)", key).groups())
        points.append((f"decode {key}", 0, batch, context, ms))
    for key, ms in data["mixed"].items():
        tokens, batch, context = map(int, re.fullmatch(r"P(\d+)_B(\d+)_C(\d+)", key).groups())
        points.append((f"mixed {key}", tokens, batch, context, ms))
    return points


@pytest.mark.parametrize("path", [GRID_FILE, STEP_TIMES_FILE], ids=lambda p: p.name)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_measured_step_is_within_ten_percent(shape: str, path) -> None:
    model = load_cost_model(shape)
    points = measured_points(path, shape)
    assert {label.split()[0] for label, *_ in points} == {"prefill", "decode", "mixed"}
    misses = []
    for label, prefill, batch, context, ms in points:
        predicted = model.step_ms(prefill, 0, batch, batch * context)
        if abs(predicted / ms - 1) > TOLERANCE:
            misses.append(f"{label}: measured {ms:.2f} ms, model {predicted:.2f} ms")
    assert not misses, "\n".join(misses)


def test_a_prefill_chunk_slows_co_scheduled_decodes_as_measured() -> None:
    """8B, 32 decodes at 2048 context: a 512-token chunk ~2x their step, a 2048-token chunk ~5.9x."""
    measured = json.loads(STEP_TIMES_FILE.read_text())["llama3_8b"]
    decodes_alone = measured["decode"]["B32_C2048"]
    model = load_cost_model("llama3_8b")
    model_alone = model.decode_ms(32, 32 * 2048)
    for chunk, expected in ((512, 2.0), (2048, 5.9)):
        measured_slowdown = measured["mixed"][f"P{chunk}_B32_C2048"] / decodes_alone
        assert measured_slowdown == pytest.approx(expected, rel=0.02)
        assert model.step_ms(chunk, 0, 32, 32 * 2048) / model_alone == pytest.approx(measured_slowdown, rel=TOLERANCE)


@pytest.mark.parametrize("shape", SHAPES)
def test_step_time_grows_with_prefill_tokens_and_decode_batch(shape: str) -> None:
    model = load_cost_model(shape)
    for batch in (0, 8, 128):
        times = [model.step_ms(tokens, 0, batch, batch * 1024) for tokens in range(1, 8193, 7)]
        assert all(later >= earlier for earlier, later in pairwise(times))
        assert times[-1] > times[0]
    for prefill in (0, 256, 2048):
        times = [model.step_ms(prefill, 0, batch, batch * 2048) for batch in range(1, 513)]
        assert all(later >= earlier for earlier, later in pairwise(times))
        assert times[-1] > times[0]


def test_cached_context_makes_a_prefill_chunk_slower() -> None:
    model = load_cost_model("llama3_8b")
    assert model.prefill_ms(512, context=4096) > model.prefill_ms(512)


def test_an_empty_step_costs_nothing_and_negative_contents_are_rejected() -> None:
    model = load_cost_model("llama3_8b")
    assert model.step_ms(0, 0, 0, 0) == 0.0
    with pytest.raises(ValueError):
        model.step_ms(-1, 0, 0, 0)


def test_models_are_cached_frozen_and_shapes_are_checked() -> None:
    model = load_cost_model("llama3_70b")
    assert isinstance(model, StepCostModel)
    assert load_cost_model("llama3_70b") is model
    with pytest.raises(AttributeError):
        model.floor_ms = 0.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown model shape"):
        load_cost_model("llama3_405b")


def test_kv_bytes_per_token_follow_the_model_shapes() -> None:
    """K and V, bf16: 2 x layers x 8 KV heads x head_dim 128 x 2 bytes."""
    assert KV_BYTES_PER_TOKEN == {"llama3_8b": 2 * 32 * 8 * 128 * 2, "llama3_70b": 2 * 80 * 8 * 128 * 2}


def test_transfer_time_is_bytes_over_link_bandwidth() -> None:
    two_k_tokens = 2048 * KV_BYTES_PER_TOKEN["llama3_8b"]  # 256 MiB
    assert transfer_ms(two_k_tokens, "tcp_10g") == pytest.approx(two_k_tokens / 1.2e9 * 1e3)
    assert transfer_ms(two_k_tokens, "nvlink") < transfer_ms(two_k_tokens, "rdma_400g") < transfer_ms(
        two_k_tokens, "tcp_100g") < transfer_ms(two_k_tokens, "tcp_10g")
    assert transfer_ms(0, "nvlink") == 0.0
    with pytest.raises(ValueError, match="unknown link"):
        transfer_ms(1, "carrier_pigeon")


# --- tensor parallelism --------------------------------------------------------------------------------

# (prefill tokens, prefill context, decode batch, decode context in all): prefill-only, decode-only, mixed.
STEPS = [(1, 0, 0, 0), (512, 0, 0, 0), (2048, 2048, 0, 0), (8192, 0, 0, 0), (0, 0, 1, 3000), (0, 0, 64, 64 * 3000),
         (0, 0, 256, 256 * 1024), (256, 1024, 32, 32 * 2048), (2048, 0, 128, 128 * 4096)]


@pytest.mark.parametrize("shape", SHAPES)
def test_tp_one_is_the_fitted_model_exactly(shape: str) -> None:
    fitted, tp1 = load_cost_model(shape), load_tensor_parallel_cost(shape, 1)
    assert tp1.base is fitted
    for step in STEPS:
        assert tp1.step_ms(*step) == fitted.step_ms(*step)  # bit for bit, not approximately
    assert tp1.prefill_ms(3000) == fitted.prefill_ms(3000) and tp1.decode_ms(8, 8000) == fitted.decode_ms(8, 8000)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_tp_step_is_faster_but_by_less_than_its_gpus(shape: str) -> None:
    fitted = load_cost_model(shape)
    for step in STEPS:
        one = fitted.step_ms(*step)
        previous = one
        for ranks in (2, 4, 8):
            ms = load_tensor_parallel_cost(shape, ranks).step_ms(*step)
            assert ms < previous, (step, ranks)  # more GPUs, a shorter step
            assert ms > one / ranks, (step, ranks)  # but the all-reduces keep it above a perfect split
            previous = ms
    assert load_tensor_parallel_cost(shape, 8).step_ms(0, 0, 0, 0) == 0.0


def test_tp_communication_is_two_ring_all_reduces_per_layer() -> None:
    """70B at TP 4, a 1000-token prefill: 80 layers x 2 all-reduces of 1000 x 8192 x 2 bytes, each 10 us
    plus 2 x 3/4 of the bytes at 370 GB/s (published NVLink 4 figures, not this calibration)."""
    fitted, tp4 = load_cost_model("llama3_70b"), load_tensor_parallel_cost("llama3_70b", 4)
    each_ms = 0.010 + 1.5 * (1000 * 8192 * 2) / 370e9 * 1e3
    assert tp4.step_ms(1000, 0, 0, 0) == pytest.approx(fitted.step_ms(1000, 0, 0, 0) / 4 + 160 * each_ms)
    # A decode step of one sequence is mostly latency: 160 x ~10 us = ~1.6 ms on top of a quarter of the floor.
    assert tp4.decode_ms(1, 3000) - fitted.decode_ms(1, 3000) / 4 == pytest.approx(1.6, abs=0.05)


def test_tp_sizes_must_split_the_kv_heads() -> None:
    for ranks in (0, 3, 16):
        with pytest.raises(ValueError, match="8 KV heads"):
            load_tensor_parallel_cost("llama3_8b", ranks)
    with pytest.raises(ValueError, match="unknown model shape"):
        load_tensor_parallel_cost("llama3_405b", 2)


def test_kv_memory_of_a_tp_worker_is_its_gpus_less_the_real_weights() -> None:
    # At TP 1 the 8B matches the simulator's long-standing 40 GB per GPU.
    assert worker_kv_memory_gb("llama3_8b", 1) == pytest.approx(KV_MEMORY_GB, abs=0.5)
    # Each added GPU brings its whole share, and frees a share of the weights on the others.
    assert worker_kv_memory_gb("llama3_8b", 2) > 2 * worker_kv_memory_gb("llama3_8b", 1)
    # The real 70B (141 GB of bf16 weights) fits neither one nor two 80 GB GPUs; four leave ~83 GB of KV.
    assert worker_kv_memory_gb("llama3_70b", 1) < 0 and worker_kv_memory_gb("llama3_70b", 2) < 0
    assert worker_kv_memory_gb("llama3_70b", 4) == pytest.approx(4 * (72 - 16) - 141.1)
    assert worker_kv_memory_gb("llama3_70b", 8) > 3 * worker_kv_memory_gb("llama3_70b", 4)


def test_a_transfer_runs_at_the_slower_of_its_transport_and_its_link() -> None:
    prompt = 3000 * KV_BYTES_PER_TOKEN["llama3_8b"]  # the two-node case: 393 MB
    # NIXL is bound by the link alone; gRPC by its own path through Python, even on a fast link.
    assert transfer_ms(prompt, "rdma_400g", "nixl") == transfer_ms(prompt, "rdma_400g") == pytest.approx(
        prompt / 50e9 * 1e3)
    grpc_ms = prompt / (TRANSPORT_GBPS["grpc"] * 1e9) * 1e3
    assert transfer_ms(prompt, "tcp_100g", "grpc") == pytest.approx(grpc_ms)
    assert transfer_ms(prompt, "rdma_400g", "nixl") < transfer_ms(prompt, "tcp_100g", "grpc") / 10
    with pytest.raises(ValueError, match="unknown KV transport"):
        transfer_ms(1, "nvlink", "carrier_pigeon")
