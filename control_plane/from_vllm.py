"""`vllm serve ...` -> an equivalent disaggregated deployment spec, with a note for every decision.

Accepted forms: `vllm serve MODEL [flags]`, `python -m vllm.entrypoints.openai.api_server --model MODEL
[flags]`, flags as `--flag value`, `--flag=value`, bare booleans (`--enforce-eager`, `--no-...`), vLLM's
short aliases (`-tp`, `-pp`, `-dp`) and underscores for dashes.

Sizing rule (the model's size cannot be read offline, so it is estimated from its name):
- the spec's node has the GPUs the original command used (TP x PP x DP), at least 2, or `gpus`;
- the pools split the node's GPUs half and half;
- per-worker TP is the smallest power of two whose GPUs hold the weights in half their memory (weights =
  parameters in the name, e.g. "8B", x bytes per parameter of the dtype; the other half is for KV and
  activations), never above the user's TP (it is known to fit) nor above half the node. Without a size
  in the name, the user's TP is kept, capped at half the node;
- each pool runs as many workers of that TP as its half holds.
So `vllm serve meta-llama/Llama-3.1-8B-Instruct -tp 8` becomes 4 prefill + 4 decode workers at TP 1.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from control_plane.spec import Spec, spec_from_dict
from dynamo_grpc.engine.registry import VLLM

VLLM_PROGRAM = "vllm"
"""The command name of `vllm serve`."""
API_SERVER_MODULES = ("vllm.entrypoints.openai.api_server", "vllm.entrypoints.api_server")
DEFAULT_GPU_MEMORY_GIB = 80.0
# How much of a worker's GPU memory the weights may take; the rest is KV cache and activations.
WEIGHT_SHARE = 0.5

SHORT_ALIASES = {"-tp": "tensor-parallel-size", "-pp": "pipeline-parallel-size", "-dp": "data-parallel-size"}
BYTES_PER_PARAMETER = {"float32": 4.0, "float": 4.0, "float16": 2.0, "half": 2.0, "bfloat16": 2.0, "auto": 2.0}
QUANTIZED_BYTES = {"fp8": 1.0, "int8": 1.0, "awq": 0.5, "gptq": 0.5, "bitsandbytes": 0.5, "gguf": 0.5}


@dataclass
class Translation:
    """What the flags of one command line have said so far."""

    model: str
    """The positional model, or the first `--model`."""
    gpus: int | None
    """The node's GPUs where given (0 after `--device cpu`); None: from the parallel sizes."""
    notes: list[str] = field(default_factory=list)
    engine_args: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    """Kept verbatim for `model.engine_args.extra`, by engine argument name."""
    parallel: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SHORT_ALIASES.values(), 1))
    served_name: str = ""
    quantization: str = ""
    security: dict[str, str] = field(default_factory=dict)
    """The spec's `security` section so far."""
    api_key: str = field(default="", repr=False)


@dataclass(frozen=True)
class VllmFlag:
    """What the translation does with one vLLM flag: `apply(translation, flag, value)`."""

    apply: Callable[[Translation, str, Any], None]
    boolean: bool = False
    """Takes no value (`--flag` alone means true; `--flag=false` is allowed)."""
    negatable: bool = False
    """`--no-flag` applies this flag with false; otherwise `--no-flag` is a flag of its own."""


def _engine_arg(arg: str, kind: type) -> VllmFlag:
    """Kept on both pools as engine argument `arg`."""
    def apply(translation: Translation, flag: str, value: Any) -> None:
        translation.engine_args[arg] = _convert(flag, value, kind)
    return VllmFlag(apply, boolean=kind is bool, negatable=kind is bool)


def _keep_verbatim(translation: Translation, flag: str, value: Any) -> None:
    """Kept under `model.engine_args.extra`; workers pass it to vLLM, which checks it."""
    translation.extra[flag.replace("-", "_")] = value
    translation.notes.append(f"--{flag} kept verbatim under model.engine_args.extra; workers get it as "
                             f"--vllm-arg {flag.replace('-', '_')}=…")


def _dropped(why: str, *, boolean: bool = False) -> VllmFlag:
    """Dropped, with a note that says why."""
    def apply(translation: Translation, flag: str, value: Any) -> None:
        translation.notes.append(f"--{flag} dropped: {why}")
    return VllmFlag(apply, boolean=boolean)


def _parallel(dropped_because: str = "") -> VllmFlag:
    """A parallel size: the command's GPU count (TP x PP x DP) sizes the node; the pools replace it."""
    def apply(translation: Translation, flag: str, value: Any) -> None:
        translation.parallel[flag] = _convert(flag, value, int)
        if dropped_because and translation.parallel[flag] > 1:
            translation.notes.append(f"--{flag} {value} dropped: {dropped_because}")
    return VllmFlag(apply)


def _model(translation: Translation, flag: str, value: Any) -> None:
    if translation.model and value != translation.model:
        translation.notes.append(f"--model {value} dropped: the positional model {translation.model} wins")
    translation.model = translation.model or str(value)


def _served_model_name(translation: Translation, flag: str, value: Any) -> None:
    names = str(value).split()
    if not names:
        raise ValueError("--served-model-name needs a name, e.g. --served-model-name llama-3-8b")
    translation.served_name = names[0]
    if len(names) > 1:
        translation.notes.append(f"--served-model-name: only the first name ({names[0]}) is served; "
                                 f"dropped {', '.join(names[1:])}")


def _device(translation: Translation, flag: str, value: Any) -> None:
    if str(value) == "cpu" and translation.gpus is None:
        translation.gpus = 0
        translation.notes.append("--device cpu: the spec's host is a CPU host (gpus: 0)")
    else:
        translation.notes.append(f"--{flag} dropped: the spec's hosts say which devices exist")


def _quantization(translation: Translation, flag: str, value: Any) -> None:
    translation.quantization = str(value)  # sizes the weights
    _keep_verbatim(translation, flag, value)


def _security(field_name: str, consequence: str = "") -> Callable[[Translation, str, Any], None]:
    """A certificate file: the spec's `security.<field_name>`, for every process."""
    def apply(translation: Translation, flag: str, value: Any) -> None:
        translation.security[field_name] = str(Path(str(value)).absolute())
        translation.notes.append(f"--{flag}: security.{field_name}, for every process"
                                 + (f" ({consequence})" if consequence else ""))
    return apply


def _api_key(translation: Translation, flag: str, value: Any) -> None:
    translation.api_key = str(value)


_KEPT_SWITCH = VllmFlag(_keep_verbatim, boolean=True)
_FRONTEND = ("a setting of vLLM's OpenAI HTTP frontend; clients reach the router's gRPC RouterService on "
             "router.port")
_KV_CONNECTOR = "dynamo-grpc configures its own KV connector"

VLLM_FLAGS: dict[str, VllmFlag] = {
    "model": VllmFlag(_model),
    "served-model-name": VllmFlag(_served_model_name),
    # Kept on both pools.
    "dtype": _engine_arg("dtype", str),
    "max-model-len": _engine_arg("max_model_len", int),
    "max-num-seqs": _engine_arg("max_num_seqs", int),
    "max-num-batched-tokens": _engine_arg("max_num_batched_tokens", int),
    "block-size": _engine_arg("block_size", int),
    "enforce-eager": _engine_arg("enforce_eager", bool),
    # Replaced by the pools: TP caps their TP (see the sizing note); PP and DP are dropped.
    "tensor-parallel-size": _parallel(),
    "pipeline-parallel-size": _parallel("pipeline parallelism is not supported; the pools use tensor "
                                        "parallelism only"),
    "data-parallel-size": _parallel("replaced by the prefill and decode pools (several workers each)"),
    "device": VllmFlag(_device),
    # Replaced by what dynamo-grpc does itself.
    "kv-transfer-config": _dropped(_KV_CONNECTOR),
    "kv-connector": _dropped(_KV_CONNECTOR),
    "distributed-executor-backend": _dropped("each worker is one process; the backend follows from its TP"),
    "disable-log-stats": _dropped("workers always collect engine stats (they report KV usage)", boolean=True),
    "config": _dropped("read the config file's settings into flags first; its contents are not seen here"),
    # Kept verbatim, as is every flag not named here; these take no value.
    "quantization": VllmFlag(_quantization),
    **dict.fromkeys((
        "trust-remote-code", "enable-prefix-caching", "enable-chunked-prefill", "disable-custom-all-reduce",
        "enable-lora", "disable-sliding-window", "skip-tokenizer-init", "enable-sleep-mode",
        "disable-async-output-proc", "enable-expert-parallel", "async-scheduling"), _KEPT_SWITCH),
    # Security: TLS on every process, the API key as the router's bearer token.
    "ssl-certfile": VllmFlag(_security("tls_cert")),
    "ssl-keyfile": VllmFlag(_security("tls_key")),
    "ssl-ca-certs": VllmFlag(_security("tls_ca", "mutual TLS: every process, the router included, requires "
                                       "client certificates this CA signed")),
    "api-key": VllmFlag(_api_key),
    # vLLM's OpenAI HTTP frontend: the router replaces it.
    **dict.fromkeys((
        "host", "port", "uds", "allowed-origins", "allowed-methods", "allowed-headers",
        "ssl-cert-reqs", "root-path", "middleware",
        "uvicorn-log-level", "chat-template", "chat-template-content-format", "response-role",
        "tool-call-parser", "tool-parser-plugin", "reasoning-parser", "api-server-count", "log-config-file",
        "max-log-len"), _dropped(_FRONTEND)),
    **dict.fromkeys((
        "allow-credentials", "disable-uvicorn-access-log", "return-tokens-as-token-ids",
        "disable-frontend-multiprocessing", "enable-request-id-headers", "enable-auto-tool-choice",
        "enable-prompt-tokens-details", "enable-server-load-tracking", "disable-fastapi-docs",
        "disable-log-requests", "enable-log-requests", "headless"), _dropped(_FRONTEND, boolean=True)),
}
"""Every vLLM flag the translation knows, by name with dashes; any other is kept verbatim."""


def spec_from_vllm(argv: list[str], *, gpus: int | None = None, host_name: str = "node-0",
                   address: str = "127.0.0.1", etcd: str = "127.0.0.1:2379",
                   gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB, name: str | None = None,
                   api_key_file: str | Path | None = None) -> tuple[Spec, list[str]]:
    """The disaggregated spec for a `vllm serve` command line, and a note for each flag dropped or decision made.

    `gpus` is the node's GPU count (default: what the command used, at least 2; 0 means a CPU host). An
    `--api-key` becomes the router's bearer token: it is written to `api_key_file` (default `<name>.api-key`
    here; readable by its owner only), which the spec's `security.auth_token_file` names, so the key itself
    is in no spec and on no process's command line.
    Raises ValueError for a command line this cannot read.
    """
    model_tag, flags = _parse_command(argv)
    translation = Translation(model=model_tag, gpus=gpus)
    for flag, value in flags:
        _apply(translation, flag, value)
    if not translation.model:
        raise ValueError("no model given: expected `vllm serve MODEL ...` or `--model MODEL`")
    engine_args, notes = translation.engine_args, translation.notes
    _fill_engine_defaults(engine_args, notes)
    gpus = _node_gpus(translation)
    bytes_per_parameter = (QUANTIZED_BYTES.get(translation.quantization)
                           or BYTES_PER_PARAMETER.get(engine_args["dtype"], 2.0))
    tp, workers, sizing = _size_pools(gpus, translation.parallel["tensor-parallel-size"],
                                      _parameters_b(translation.model), bytes_per_parameter, gpu_memory_gib)
    notes.append(sizing)

    served_name = translation.served_name or translation.model
    extra = translation.extra
    model: dict[str, Any] = {"path": translation.model, "served_name": served_name, "engine": VLLM.name,
                             "engine_args": {**engine_args, **({"extra": extra} if extra else {})}}
    pool = {"workers": workers, "tensor_parallel_size": tp, "hosts": [host_name]}
    spec = spec_from_dict({
        "name": name or _slug(served_name), "model": model,
        "hosts": [{"name": host_name, "address": address, "gpus": gpus}],
        "prefill": dict(pool), "decode": dict(pool),
        "router": {"port": 50051, "policy": "kv_aware"},
        "etcd": [etcd],
        **({"security": translation.security} if translation.security else {}),
    }, source="from-vllm")
    if translation.api_key:
        spec = _with_api_key(spec, translation.api_key, Path(api_key_file or f"{spec.name}.api-key"), notes)
    return spec, notes


def _with_api_key(spec: Spec, key: str, path: Path, notes: list[str]) -> Spec:
    """The key written to `path` (owner-only), and the spec's router requiring it."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(key + "\n")
    notes.append(f"--api-key: written to {path} (mode 600); the router requires it as a bearer token "
                 "(security.auth_token_file); clients send it as `authorization: Bearer <key>`")
    security = dataclasses.replace(spec.security, auth_token_file=str(path.absolute()))
    return dataclasses.replace(spec, security=security)


def _fill_engine_defaults(engine_args: dict[str, Any], notes: list[str]) -> None:
    """vLLM's defaults where the worker's differ, and a note for each argument left to the worker."""
    if "dtype" not in engine_args:
        engine_args["dtype"] = "auto"
        notes.append("dtype: auto (vLLM's default; the worker's own default is float32)")
    for arg, worker_default in (("max_model_len", 2048), ("max_num_seqs", 8)):
        if arg not in engine_args:
            notes.append(f"{arg} not given: vLLM picks it, the worker defaults to {worker_default}; "
                         f"set model.engine_args.{arg} to change it")
    if "enforce_eager" not in engine_args:
        engine_args["enforce_eager"] = False
        notes.append("enforce_eager: false (vLLM's default; the worker's own default is true, for CPUs)")


def _node_gpus(translation: Translation) -> int:
    """The GPUs given (or `--device cpu`'s 0), else the command's TP x PP x DP, at least one per pool."""
    if translation.gpus is not None:
        return translation.gpus
    parallel = translation.parallel
    used = parallel["tensor-parallel-size"] * parallel["pipeline-parallel-size"] * parallel["data-parallel-size"]
    if used < 2:
        translation.notes.append(f"the command used {used} GPU; disaggregation needs one per pool, so the "
                                 "spec asks for 2 (pass the node's real GPU count to use more)")
    return max(2, used)


def _apply(translation: Translation, flag: str, value: Any) -> None:
    rule = VLLM_FLAGS.get(flag)
    negated = VLLM_FLAGS.get(flag.removeprefix("no-")) if flag.startswith("no-") else None
    if rule is None and negated is not None and negated.negatable:
        rule, value = negated, False
    if rule is None:
        _keep_verbatim(translation, flag, value)
    else:
        rule.apply(translation, flag, value)


def _takes_no_value(flag: str) -> bool:
    def boolean(name: str) -> bool:
        return name in VLLM_FLAGS and VLLM_FLAGS[name].boolean

    return boolean(flag) or (flag.startswith("no-") and boolean(flag[3:]))


def _parse_command(argv: list[str]) -> tuple[str, list[tuple[str, Any]]]:
    """The positional model (or "") and the flags as (name with dashes, value), in order."""
    args = list(argv)
    if args and args[0] == "--":
        args = args[1:]
    if args and PurePath(args[0]).name == VLLM_PROGRAM:
        args = args[1:]
        if not args or args[0] != "serve":
            raise ValueError(f"expected `vllm serve ...`, got `vllm {' '.join(args[:1])}`")
        args = args[1:]
    elif args and args[0] == "serve":
        args = args[1:]
    elif args and re.fullmatch(r"python[0-9.]*", PurePath(args[0]).name):
        if len(args) < 3 or args[1] != "-m" or args[2] not in API_SERVER_MODULES:
            raise ValueError(f"expected `python -m {API_SERVER_MODULES[0]} ...`, got `{' '.join(args[:3])}`")
        args = args[3:]
    elif args and args[0] == "-m" and len(args) > 1 and args[1] in API_SERVER_MODULES:
        args = args[2:]
    model = ""
    flags: list[tuple[str, Any]] = []
    index = 0
    while index < len(args):
        token = args[index]
        index += 1
        if not token.startswith("-") or _is_number(token):
            if model:
                raise ValueError(f"unexpected argument {token!r} (the model is already {model!r})")
            model = token
            continue
        name, has_value, value = token.partition("=")
        name = SHORT_ALIASES.get(name, name.lstrip("-").replace("_", "-"))
        boolean = _takes_no_value(name)
        if has_value:
            flags.append((name, _convert(name, value, bool) if boolean else value))
        elif boolean or index >= len(args) or (args[index].startswith("-") and not _is_number(args[index])):
            flags.append((name, True))
        else:
            flags.append((name, args[index]))
            index += 1
    return model, flags


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _convert(flag: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"--{flag} expects true or false, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{flag} expects {'an integer' if kind is int else kind.__name__}, got {value!r}") from None


def _parameters_b(model: str) -> float | None:
    """Billions of parameters from a name like Llama-3.1-8B-Instruct or Mixtral-8x7B; None if it has none."""
    found = re.search(r"(?<![a-z0-9.])(?:(\d+)x)?(\d+(?:\.\d+)?)b(?![a-z0-9])", PurePath(model).name.lower())
    if not found:
        return None
    experts = int(found.group(1)) if found.group(1) else 1
    return experts * float(found.group(2))


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _size_pools(gpus: int, user_tp: int, parameters_b: float | None, bytes_per_parameter: float,
                gpu_memory_gib: float) -> tuple[int, int, str]:
    """(TP per worker, workers per pool, a note that explains them)."""
    if gpus == 0:
        return 1, 1, "sizing: CPU host, so 1 prefill + 1 decode worker at TP 1"
    if gpus < 2:
        raise ValueError(f"disaggregation needs at least 2 GPUs (one per pool), got {gpus}; pass gpus=0 for a CPU host")
    half = gpus // 2
    cap = min(_power_of_two_at_most(user_tp), _power_of_two_at_most(half))
    if parameters_b is None:
        tp = cap
        why = (f"the model's size is not in its name, so the user's TP {user_tp} is kept, capped at half the node "
               f"({half} GPUs)")
    else:
        weights_gib = parameters_b * 1e9 * bytes_per_parameter / 2**30
        fit = 1
        while weights_gib > WEIGHT_SHARE * fit * gpu_memory_gib and fit < 1024:
            fit *= 2
        tp = min(fit, cap)
        why = (f"{parameters_b:g}B parameters x {bytes_per_parameter:g} bytes = {weights_gib:.0f} GiB of weights "
               f"fit in {WEIGHT_SHARE:.0%} of {fit} x {gpu_memory_gib:g} GiB GPUs")
        if fit > cap:
            why += f"; capped at TP {tp} (the user's TP {user_tp} or half the node): it may not fit, add nodes"
    workers = half // tp
    idle = gpus - 2 * workers * tp
    note = (f"sizing: {gpus} GPUs split half and half; TP {tp} per worker because {why}; so {workers} prefill + "
            f"{workers} decode workers")
    return tp, workers, note + (f"; {idle} GPU(s) left idle" if idle else "")


def _slug(name: str) -> str:
    """A spec name from a model name: lowercase letters, digits and '-'."""
    slug = re.sub(r"[^a-z0-9]+", "-", PurePath(name).name.lower()).strip("-")[:40].strip("-")
    return slug or "vllm-disagg"
