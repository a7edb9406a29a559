"""A prompt's token ids as the engines will see them, so the router can look its blocks up."""

from __future__ import annotations

import logging
from typing import Any

from dynamo_grpc.engine.registry import ENGINES
from dynamo_grpc.v1 import common_pb2 as pb

log = logging.getLogger(__name__)

MAX_ROUTED_PROMPT_TOKENS = 2**20  # past every served model's context today


class PromptTokenizer:
    """Token-id prompts are used as they are; text is tokenized like the serving engine does: by the
    engine's own tokenizer when it has one that needs no model files (the simulated engine's bytes), else
    by the model's Hugging Face tokenizer (`tokenizer_dir`). Without one, such text prompts are routed by
    load alone."""

    def __init__(self, tokenizer_dir: str = "") -> None:
        self._dir = tokenizer_dir
        self._hf: Any = None
        self._max_chars = 0
        self._warned = False

    def token_ids(self, params: pb.GenerationParams, engine: str) -> tuple[int, ...] | None:
        """The prompt's token ids, or None to route it by load: also when it is longer than any context
        (MAX_ROUTED_PROMPT_TOKENS), which the worker refuses; hashing it here would stall every request."""
        if params.prompt.WhichOneof("form") == "token_ids":
            ids = params.prompt.token_ids.ids
            return tuple(ids) if len(ids) <= MAX_ROUTED_PROMPT_TOKENS else None
        text = params.prompt.text
        kind = ENGINES.get(engine)
        if kind is not None and kind.tokenize_text is not None:
            # An engine tokenizer of this kind (bytes) makes at least a token per character.
            return kind.tokenize_text(text) if len(text) <= MAX_ROUTED_PROMPT_TOKENS else None
        if self._dir and self._hf is None:
            try:
                from transformers import AutoTokenizer

                self._hf = AutoTokenizer.from_pretrained(self._dir)
                # vLLM's own bound on a text prompt before it tokenizes one (its `max_chars_per_token`).
                self._max_chars = self._hf.model_max_length * max(len(t) for t in self._hf.get_vocab())
            except Exception as error:  # noqa: BLE001 - a bad tokenizer must not fail requests
                log.warning("router: cannot load the tokenizer in %s (%s); text prompts are routed by load only",
                            self._dir, error)
                self._dir, self._warned = "", True
        if self._hf is not None:
            if len(text) > self._max_chars:
                return None  # longer than the context can hold: the worker refuses it; tokenizing would stall us
            # Special tokens as the engine adds them (vLLM tokenizes with add_special_tokens=True).
            return tuple(self._hf(text)["input_ids"])
        if not self._warned:
            self._warned = True
            log.warning("router: text prompts for %s workers are routed by load only; pass --tokenizer to "
                        "route them by prefix-cache hits too", engine)
        return None
