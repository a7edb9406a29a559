"""Independent reference outputs: HF transformers' greedy generation on the tiny local Llama."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def _load(model_dir: Path):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoTokenizer.from_pretrained(model_dir),
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())


def hf_greedy(model_dir: Path, prompt: str | list[int], max_tokens: int) -> list[int]:
    import torch

    tokenizer, model = _load(model_dir)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"] if isinstance(prompt, str) else torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_tokens, min_new_tokens=max_tokens)
    return out[0, ids.shape[1]:].tolist()


def hf_tokens(model_dir: Path, prompt: str) -> list[int]:
    tokenizer, _ = _load(model_dir)
    return tokenizer(prompt)["input_ids"]
