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


def hf_logprobs(model_dir: Path, prompt_ids: list[int], generated_ids: list[int]) -> list[float]:
    """Log probability HF transformers gives each generated token, after the prompt and the ones before."""
    import torch

    _, model = _load(model_dir)
    ids = torch.tensor([prompt_ids + generated_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    positions = range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(generated_ids))
    return [logprobs[p, t].item() for p, t in zip(positions, generated_ids)]
