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
    StepCostModel,
    load_cost_model,
    transfer_ms,
)

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
