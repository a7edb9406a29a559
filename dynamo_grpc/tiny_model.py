"""A tiny Llama checkpoint built locally, so real-engine tests need neither a model hub nor a GPU.

The model is random (seeded), not trained: it exists to exercise the serving path end to end
(tokenizer, chat template, engine start, KV cache, sampling), where the only thing that matters about
its outputs is that they are deterministic and differ between prompts. Everything, including the
tokenizer's training corpus, is generated here, so two builds are byte-identical and a test can
compare one engine's tokens against another's (vLLM against HF transformers).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

VOCAB_SIZE = 4096
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>")
BOS_TOKEN_ID, EOS_TOKEN_ID, UNK_TOKEN_ID, PAD_TOKEN_ID = range(4)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
"""Plain `role: content` lines: enough for an OpenAI-style chat request to become a prompt."""

DEFAULT_MODEL_DIR = Path(
    os.environ.get("DYNAMO_GRPC_MODEL_DIR") or Path.home() / ".cache" / "dynamo-grpc" / "tiny-llama"
)

# A build is complete when all of these exist; they are written into a temporary sibling directory
# (`.<name>.partial-*`) that is renamed into place last, so a crashed build never leaves a directory that
# looks complete. Builds of one directory take turns on a lock file beside it (`.<name>.lock`).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

_WORDS = """
the a an this that every some many few no one two three four five six seven eight nine ten
river mountain city garden window kitchen library market station bridge forest ocean island
teacher farmer doctor pilot sailor painter writer student engineer baker gardener musician
cat dog horse bird fish fox wolf bear rabbit owl whale turtle spider bee dragon
apple bread cheese coffee tea soup rice honey lemon pepper salt sugar butter
red blue green yellow purple orange silver golden dark bright quiet loud small large ancient
new old warm cold wet dry soft hard quick slow happy sad brave gentle clever strange
walks runs sings reads writes builds opens closes finds loses carries watches remembers
forgets paints cooks sells buys teaches learns follows crosses climbs answers asks waits
because although while when before after until since unless whether however therefore
morning evening night winter summer spring autumn yesterday tomorrow today always never often
computer network server request response token model engine cache memory packet router
prefill decode transfer latency throughput batch queue worker scheduler kernel tensor
north south east west above below inside outside between under over through across toward
""".split()

_SYLLABLES = "ka lo mi ren tur vash el dor fin gal ith mor ne pra quo sil tha ul ven wyr xo yel zan".split()


def _corpus(n_sentences: int = 6000) -> list[str]:
    """English-like sentences from a fixed word list plus seeded pseudo-words (names, places).

    The pseudo-words give BPE enough distinct material to fill a 4096-entry vocabulary; a seeded
    `random.Random` keeps the corpus, and therefore the merges, identical on every build.
    """
    rng = random.Random(0)
    names = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(1500)})
    lines = []
    for i in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        for _ in range(rng.randint(0, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(names).capitalize())
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 2048)))
        sentence = " ".join(words)
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice(".!?,;:"))
        if i % 7 == 0:
            lines.append(f'"{rng.choice(names)}", said the {rng.choice(_WORDS)} (page {i}).')
    return lines


def _build_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Prepend <s> like Llama tokenizers do, so HF and vLLM see the same prompt ids.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_TOKEN_ID)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )
    fast.save_pretrained(out_dir)


def _build_model(out_dir: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        max_position_embeddings=2048,
        # The default 0.02 gives near-uniform logits and one token repeated forever; a wider init
        # makes greedy continuations depend visibly on the prompt.
        initializer_range=0.2,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    with _no_progress_bars():  # one shard, written in a blink; callers say what is happening
        model.save_pretrained(out_dir)  # safetensors is the only format transformers 5 writes


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def is_complete(model_dir: Path) -> bool:
    return all((Path(model_dir) / name).is_file() for name in _REQUIRED_FILES)


def build_tiny_model(out_dir: Path = DEFAULT_MODEL_DIR, *, force: bool = False) -> Path:
    """Build the tiny model and tokenizer into `out_dir` (if not already there) and return it.

    Safe when several processes or threads build the same directory at once: they take turns under
    a file lock, and whoever comes second finds the model complete and builds nothing.
    """
    out_dir = Path(out_dir).expanduser()
    if is_complete(out_dir) and not force:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(out_dir):
        if is_complete(out_dir) and not force:
            return out_dir
        _remove_leftovers(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out_dir), dir=out_dir.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the model is meant to be shared
            _build_tokenizer(tmp)
            _build_model(tmp)
            _swap_into_place(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _temp_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.partial-"


@contextlib.contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    """An exclusive flock on `.<name>.lock` beside `out_dir`. Each call opens the file itself, so the lock
    also keeps apart threads of one process (flock locks belong to the open file, not the process)."""
    with open(out_dir.parent / f".{out_dir.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_leftovers(out_dir: Path) -> None:
    """Temp dirs of builds that died; under the lock no other build can be writing one."""
    for leftover in out_dir.parent.glob(f"{_temp_prefix(out_dir)}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished build to `out_dir`; an old or partial `out_dir` is moved aside first and removed
    after, so `out_dir` is never a half-deleted directory that a reader could take for a model."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(out_dir), dir=out_dir.parent))
        out_dir.rename(old / out_dir.name)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
