"""The tiny Llama checkpoint: deterministic to the byte, a tokenizer that round-trips, and greedy
outputs that depend on the prompt (the property the vLLM-vs-HF comparison relies on)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_grpc.tiny_model import BOS_TOKEN_ID, EOS_TOKEN_ID, VOCAB_SIZE, build_tiny_model, is_complete

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402


def _hashes(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.iterdir())}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def test_build_is_byte_deterministic(model_dir: Path, tmp_path: Path) -> None:
    first = _hashes(model_dir)
    again = build_tiny_model(tmp_path / "again", force=True)
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= first.keys()
    assert _hashes(again) == first
    # Rebuilding in place with force also gives the same bytes and leaves no temp dirs behind.
    build_tiny_model(again, force=True)
    assert _hashes(again) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [".again.lock", "again"]


def test_build_is_idempotent(model_dir: Path) -> None:
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(model_dir) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_incomplete_dir_is_rebuilt(tmp_path: Path) -> None:
    partial = tmp_path / "model"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    assert not is_complete(partial)
    build_tiny_model(partial)
    assert is_complete(partial)


# Two threads in each of two fresh interpreters: the way `serve` starts a prefill and a decode worker,
# and the way two `serve` runs on one machine meet. A fresh interpreter has not imported transformers
# yet, so the threads' imports race as they do on a first run.
_BUILD_IN_THREADS = """
import sys
from concurrent.futures import ThreadPoolExecutor
from dynamo_grpc.tiny_model import build_tiny_model
with ThreadPoolExecutor(2) as pool:
    print(*pool.map(build_tiny_model, [sys.argv[1]] * 2))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_concurrent_builds_share_one_complete_model(model_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "model"
    builders = [subprocess.Popen([sys.executable, "-c", _BUILD_IN_THREADS, str(target)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for builder in builders:
        out, err = builder.communicate(timeout=280)
        assert builder.returncode == 0, err[-3000:]
        assert out.split() == [str(target)] * 2
    assert _hashes(target) == _hashes(model_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]


def test_leftover_temp_dir_is_not_taken_for_the_model(model_dir: Path, tmp_path: Path) -> None:
    # A build that died after writing every file but before its rename.
    leftover = tmp_path / ".model.partial-dead"
    leftover.mkdir()
    for name in _hashes(model_dir):
        (leftover / name).write_text("half-written")
    target = tmp_path / "model"
    assert not is_complete(target)
    assert build_tiny_model(target) == target
    assert _hashes(target) == _hashes(model_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]


@pytest.mark.parametrize("text", [
    "Hello, world!",
    "The router sends 42 requests to the decode pool.",
    "Unicode: héllo wörld, “quotes”, 日本語 and 🚀\n\ttabs and  double  spaces",
])
def test_tokenizer_round_trips(tokenizer, text: str) -> None:
    ids = tokenizer(text).input_ids
    assert ids[0] == BOS_TOKEN_ID
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_tokenizer_metadata(tokenizer) -> None:
    assert len(tokenizer) == VOCAB_SIZE
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS_TOKEN_ID, EOS_TOKEN_ID)
    # English words are merged, not spelled out byte by byte.
    assert len(tokenizer("The river", add_special_tokens=False).input_ids) == 2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<s>user: hi\nassistant:"


def test_greedy_continuations_differ_by_prompt(model_dir: Path, tokenizer) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert model.dtype == torch.float32
    outputs = []
    with torch.inference_mode():
        for prompt in ["Hello, my name is", "The capital of France is", "Once upon a time"]:
            ids = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**ids, do_sample=False, max_new_tokens=12, min_new_tokens=12,
                                 pad_token_id=tokenizer.pad_token_id)
            outputs.append(tuple(out[0, ids.input_ids.shape[1]:].tolist()))
    assert len(set(outputs)) == len(outputs)
    for tokens in outputs:
        assert len(set(tokens)) > len(tokens) // 2, f"degenerate greedy output {tokens}"
