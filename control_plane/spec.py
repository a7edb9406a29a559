"""The declarative deployment spec: a YAML file that says what to run, checked before anything starts.

A spec names the model, the hosts, the prefill and decode pools, the router, SLO targets, KV transfer
policy and etcd. `parse_spec` reads it into frozen dataclasses with every default filled in, or raises
`SpecError` listing every problem at once as `file:line: field.path: message`, with a fix where one is
obvious, so a bad spec is fixed in one edit instead of one error per run.

    name: llama-disagg
    model: {path: /models/llama-3-8b, served_name: llama-3-8b, engine: vllm,
            engine_args: {dtype: bfloat16, max_model_len: 8192}}
    hosts: [{name: node-a, address: 10.0.0.1, gpus: 8}]
    prefill: {workers: 4, tensor_parallel_size: 1, hosts: [node-a], engine_args: {max_num_batched_tokens: 8192}}
    decode:  {workers: 4, tensor_parallel_size: 1, hosts: [node-a]}
    router:  {port: 50051, policy: kv_aware, disaggregation: {min_uncached_tokens: 512}, workers: 4}
    slo: {ttft_ms: 500, itl_ms: 50}
    transfer: {kv_ttl_s: 30, on_pull_failure: fail}
    etcd: [10.0.0.1:2379]
    autoscaling: {prefill_requests_per_s: 1.2, decode_requests_per_s: 2.5}   # optional
    security: {tls_cert: /etc/dynamo-grpc/tls/node.crt, tls_key: /etc/dynamo-grpc/tls/node.key,
               tls_ca: /etc/dynamo-grpc/tls/ca.crt, auth_token_file: /etc/dynamo-grpc/token}   # optional

A host with `gpus: 0` is a CPU host: its workers get no devices, and with `cpus: N` (its cores) each
engine worker gets its own share of the cores 0..N-1, as `--cpus`. A pool's workers are spread over its
hosts round-robin (`pool_placement`). Engine arguments under `model.engine_args` apply to both pools; a
pool's own `engine_args` add to or override them. `engine_args.extra` holds any other vLLM engine
argument; vLLM workers get each as `--vllm-arg KEY=VALUE`.

With `autoscaling`, each pool's `workers` is its most: the control plane runs between zero and that many,
sized from the live load and the `slo` objectives (`control_plane.scaling`). The per-worker rates are
what one worker sustains within the objectives; `dynamo-grpc plan --spec-out` writes them.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from control_plane.autoscaler import AutoscalingTuning, tuning_knobs
from dynamo_grpc.config import KV_PULL_FAILURE_POLICIES, ROUTING_POLICIES
from dynamo_grpc.engine.registry import DEFAULT_ENGINE, ENGINES

DEFAULT_ROUTER_PORT = 50051
DEFAULT_CONTROL_PLANE_PORT = 50052
DEFAULT_BASE_PORT = 50100
# Set from the model section, so not allowed under engine_args.
_MODEL_FIELDS = tuple(sorted({name for kind in ENGINES.values()
                              for name in (kind.served_name_field, kind.model_path_field) if name}))
_POOL_FIELDS = ("tensor_parallel_size",)
"""Set by the pool itself, so not allowed under engine_args either."""
_NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")

Scalar = str | int | float | bool


@dataclass(frozen=True)
class ModelSpec:
    path: str
    served_name: str
    engine: str = DEFAULT_ENGINE
    engine_args: dict[str, Scalar] = field(default_factory=dict)
    extra_engine_args: dict[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class HostSpec:
    name: str
    address: str
    gpus: int = 0
    cpus: int = 0
    """A CPU host's cores (ids 0..cpus-1), split evenly between its engine workers; 0: not said, and each
    engine keeps its own binding."""


@dataclass(frozen=True)
class PoolSpec:
    """A prefill or decode pool: `workers` engines of `tensor_parallel_size` devices each."""

    role: str
    workers: int
    tensor_parallel_size: int
    hosts: tuple[str, ...]
    engine_args: dict[str, Scalar] = field(default_factory=dict)
    extra_engine_args: dict[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class RouterSpec:
    host: str
    port: int = DEFAULT_ROUTER_PORT
    policy: str = "kv_aware"
    min_uncached_tokens: int = 0
    """Prompts with fewer uncached tokens than this may be served without a separate prefill."""
    workers: int = 0
    """Router processes sharing the port (`--workers`); 0: sized to the host by the compiler."""


@dataclass(frozen=True)
class ControlPlaneSpec:
    host: str
    port: int = DEFAULT_CONTROL_PLANE_PORT


@dataclass(frozen=True)
class SloSpec:
    ttft_ms: float | None = None
    itl_ms: float | None = None


@dataclass(frozen=True)
class TransferSpec:
    kv_ttl_s: float = 30.0
    on_pull_failure: str = "fail"


@dataclass(frozen=True)
class SecuritySpec:
    """Files on every host: each process serves and calls with `tls_cert` and `tls_key` (`--tls-cert`,
    `--tls-key`); with `tls_ca`, mutual TLS between all of them; the router requires the token in
    `auth_token_file`. Empty: plaintext, no token."""

    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    auth_token_file: str = ""

    def to_dict(self) -> dict[str, str]:
        return {name: value for name, value in vars(self).items() if value}


@dataclass(frozen=True)
class AutoscalingSpec:
    """The `autoscaling` section: per-worker rates, then the knobs of `AutoscalingTuning` by their names."""

    prefill_requests_per_s: float
    """Requests/s one prefill worker sustains within the objectives."""
    decode_requests_per_s: float
    """Requests/s one decode worker sustains within the objectives."""
    tuning: AutoscalingTuning = field(default_factory=AutoscalingTuning)
    cold_start_wait_s: float = 120.0
    """How long a request that finds no worker waits at the router for one to start."""

    def to_dict(self) -> dict[str, float]:
        """The section as YAML has it: the knobs flat, between the rates and `cold_start_wait_s`."""
        return {"prefill_requests_per_s": self.prefill_requests_per_s,
                "decode_requests_per_s": self.decode_requests_per_s,
                **{knob.name: getattr(self.tuning, knob.name) for knob in tuning_knobs()},
                "cold_start_wait_s": self.cold_start_wait_s}


@dataclass(frozen=True)
class Spec:
    name: str
    model: ModelSpec
    hosts: tuple[HostSpec, ...]
    prefill: PoolSpec
    decode: PoolSpec
    router: RouterSpec
    control_plane: ControlPlaneSpec
    etcd: tuple[str, ...]
    namespace: str = ""
    base_port: int = DEFAULT_BASE_PORT
    slo: SloSpec = SloSpec()
    transfer: TransferSpec = TransferSpec()
    autoscaling: AutoscalingSpec | None = None
    security: SecuritySpec = SecuritySpec()

    def host(self, name: str) -> HostSpec:
        return next(h for h in self.hosts if h.name == name)

    def pools(self) -> tuple[PoolSpec, PoolSpec]:
        return self.prefill, self.decode

    def engine_args_for(self, pool: PoolSpec) -> dict[str, Scalar]:
        """The model's engine arguments with the pool's on top."""
        return {**self.model.engine_args, **pool.engine_args}


def pool_placement(pool: PoolSpec) -> list[str]:
    """The host of each worker of the pool: round-robin over its hosts, so every host gets its share."""
    return [pool.hosts[index % len(pool.hosts)] for index in range(pool.workers)]


def engine_arg_defaults(engine: str) -> dict[str, Any]:
    """Engine arguments a spec may set for `engine`, with the worker's defaults (their types check values)."""
    kind = ENGINES[engine]
    passthrough = kind.passthrough.field if kind.passthrough else ""
    return {f.name: f.default for f in fields(kind.config)
            if f.name not in (*_MODEL_FIELDS, *_POOL_FIELDS, passthrough)}


@dataclass(frozen=True)
class Problem:
    source: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.path or '(spec)'}: {self.message}"


class SpecError(ValueError):
    """Every problem found in a spec, one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{count} in the deployment spec:\n" + "\n".join(f"  {p}" for p in problems))


def load_spec(path: str | Path) -> Spec:
    return parse_spec(Path(path).read_text(), source=str(path))


def parse_spec(text: str, *, source: str = "<spec>") -> Spec:
    """Parse and check a YAML spec, keeping each value's line for the messages."""
    try:
        root = _compose(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        line = mark.line + 1 if mark else 0
        problem = getattr(error, "problem", None) or str(error)
        raise SpecError([Problem(source, line, "", f"not valid YAML: {problem}")]) from None
    if root is None:
        raise SpecError([Problem(source, 1, "", "the spec is empty; start with `name:`, `model:`, `hosts:`")])
    return _Checker(source).spec(root)


def spec_from_dict(data: dict[str, Any], *, source: str = "<spec>") -> Spec:
    """Check a spec built in code (no line numbers) exactly like a file."""
    return _Checker(source).spec(_from_python(data))


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    """The spec as plain data, every default spelled out; `spec_from_dict` reads it back equal."""
    def engine_args(args: dict[str, Scalar], extra: dict[str, Scalar]) -> dict[str, Any]:
        return {**args, **({"extra": dict(extra)} if extra else {})}

    def pool(p: PoolSpec) -> dict[str, Any]:
        out: dict[str, Any] = {"workers": p.workers, "tensor_parallel_size": p.tensor_parallel_size,
                               "hosts": list(p.hosts)}
        if p.engine_args or p.extra_engine_args:
            out["engine_args"] = engine_args(p.engine_args, p.extra_engine_args)
        return out

    model: dict[str, Any] = {**({"path": spec.model.path} if spec.model.path else {}),
                             "served_name": spec.model.served_name, "engine": spec.model.engine}
    if spec.model.engine_args or spec.model.extra_engine_args:
        model["engine_args"] = engine_args(spec.model.engine_args, spec.model.extra_engine_args)
    out: dict[str, Any] = {
        "name": spec.name, "namespace": spec.namespace, "model": model,
        "hosts": [{"name": h.name, "address": h.address, "gpus": h.gpus,
                   **({"cpus": h.cpus} if h.cpus else {})} for h in spec.hosts],
        "prefill": pool(spec.prefill), "decode": pool(spec.decode),
        "router": {"host": spec.router.host, "port": spec.router.port, "policy": spec.router.policy,
                   "disaggregation": {"min_uncached_tokens": spec.router.min_uncached_tokens},
                   **({"workers": spec.router.workers} if spec.router.workers else {})},
        "control_plane": {"host": spec.control_plane.host, "port": spec.control_plane.port},
        "base_port": spec.base_port,
        "transfer": {"kv_ttl_s": spec.transfer.kv_ttl_s, "on_pull_failure": spec.transfer.on_pull_failure},
        "etcd": list(spec.etcd),
    }
    slo = {k: v for k, v in (("ttft_ms", spec.slo.ttft_ms), ("itl_ms", spec.slo.itl_ms)) if v is not None}
    if slo:
        out["slo"] = slo
    if spec.autoscaling is not None:
        out["autoscaling"] = spec.autoscaling.to_dict()
    if spec.security.to_dict():
        out["security"] = spec.security.to_dict()
    return out


def dump_spec(spec: Spec) -> str:
    return yaml.safe_dump(spec_to_dict(spec), sort_keys=False, default_flow_style=False)


# --- the YAML tree, with lines ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Node:
    """A YAML value with the (1-based) line it starts on; mappings and lists hold _Nodes."""

    value: Any
    line: int
    duplicate_keys: tuple[tuple[str, int], ...] = ()
    key_lines: dict[Any, int] = field(default_factory=dict)


def _compose(text: str) -> _Node | None:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        return None if root is None else _convert(loader, root)
    finally:
        loader.dispose()


def _convert(loader: yaml.SafeLoader, node: yaml.Node) -> _Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        items: dict[Any, _Node] = {}
        key_lines: dict[Any, int] = {}
        duplicates = []
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in items:
                duplicates.append((str(key), key_node.start_mark.line + 1))
            items[key] = _convert(loader, value_node)
            key_lines[key] = key_node.start_mark.line + 1
        return _Node(items, line, tuple(duplicates), key_lines)
    if isinstance(node, yaml.SequenceNode):
        return _Node([_convert(loader, item) for item in node.value], line)
    return _Node(loader.construct_object(node, deep=True), line)


def _from_python(value: Any) -> _Node:
    if isinstance(value, dict):
        return _Node({k: _from_python(v) for k, v in value.items()}, 0)
    if isinstance(value, (list, tuple)):
        return _Node([_from_python(v) for v in value], 0)
    return _Node(value, 0)


# --- checking ------------------------------------------------------------------------------------------

_MISSING = object()


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    return f"{value!r} ({type(value).__name__})"


def _suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


class _Checker:
    """Walks the YAML tree once, collecting problems instead of stopping at the first."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []

    def problem(self, line: int, path: str, message: str) -> None:
        self.problems.append(Problem(self.source, line, path, message))

    # Typed readers: each returns the value, or _MISSING after recording a problem.

    def mapping(self, node: _Node, path: str, required: tuple[str, ...], optional: tuple[str, ...]
                ) -> dict[str, _Node] | None:
        if not isinstance(node.value, dict):
            self.problem(node.line, path, f"expected a mapping with {', '.join(required + optional)}, "
                         f"got {_kind(node.value)}")
            return None
        for key, line in node.duplicate_keys:
            self.problem(line, self.join(path, key), "given twice; the later value would win, keep one")
        known = required + optional
        items: dict[str, _Node] = {}
        for key, child in node.value.items():
            if key not in known:
                hint = _suggest(str(key), known) or f" (allowed: {', '.join(known)})"
                self.problem(node.key_lines.get(key, child.line), self.join(path, str(key)), f"unknown field{hint}")
            else:
                items[key] = child
        for key in required:
            if key not in items:
                self.problem(node.line, self.join(path, key), "missing required field")
        return items

    @staticmethod
    def join(path: str, key: str) -> str:
        return f"{path}.{key}" if path else key

    def string(self, node: _Node | None, path: str, default: Any = _MISSING) -> Any:
        if node is None:
            return default
        if not isinstance(node.value, str) or not node.value:
            self.problem(node.line, path, f"expected a non-empty string, got {_kind(node.value)}")
            return _MISSING
        return node.value

    def integer(self, node: _Node | None, path: str, *, minimum: int | None = None,
                maximum: int | None = None, default: Any = _MISSING) -> Any:
        if node is None:
            return default
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(node.line, path, f"expected an integer, got {_kind(value)}")
            return _MISSING
        if minimum is not None and value < minimum:
            self.problem(node.line, path, f"must be at least {minimum}, got {value}")
            return _MISSING
        if maximum is not None and value > maximum:
            self.problem(node.line, path, f"must be at most {maximum}, got {value}")
            return _MISSING
        return value

    def positive_number(self, node: _Node | None, path: str, default: Any = _MISSING) -> Any:
        if node is None:
            return default
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problem(node.line, path, f"expected a number, got {_kind(value)}")
            return _MISSING
        if value <= 0:
            self.problem(node.line, path, f"must be positive, got {value}")
            return _MISSING
        return float(value)

    def choice(self, node: _Node | None, path: str, choices: tuple[str, ...], what: str,
               default: Any = _MISSING) -> Any:
        value = self.string(node, path, default)
        if value is _MISSING or value is default:
            return value
        if value not in choices:
            assert node is not None
            self.problem(node.line, path, f"unknown {what} {value!r}{_suggest(value, choices)} "
                         f"(choose from {', '.join(choices)})")
            return _MISSING
        return value

    def port(self, node: _Node | None, path: str, default: int) -> Any:
        if node is None:
            return default
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(node.line, path, f"expected a port number, got {_kind(value)}")
            return _MISSING
        if not 1 <= value <= 65535:
            self.problem(node.line, path, f"port must be in 1..65535, got {value}")
            return _MISSING
        return value

    def string_list(self, node: _Node | None, path: str) -> list[tuple[str, int]] | None:
        """Strings with their lines; None (after a problem) when the value is not a list of strings."""
        if node is None:
            return None
        if not isinstance(node.value, list):
            self.problem(node.line, path, f"expected a list, got {_kind(node.value)}")
            return None
        out = []
        for index, item in enumerate(node.value):
            value = self.string(item, f"{path}[{index}]")
            if value is not _MISSING:
                out.append((value, item.line or node.line))
        return out

    # The spec, section by section.

    def spec(self, root: _Node) -> Spec:
        top = self.mapping(root, "", ("name", "model", "hosts", "prefill", "decode", "etcd"),
                           ("namespace", "router", "control_plane", "slo", "transfer", "base_port", "autoscaling",
                            "security"))
        if top is None:
            raise SpecError(self.problems)
        name = self.string(top.get("name"), "name")
        if name is not _MISSING and not _NAME_PATTERN.match(name):
            self.problem(top["name"].line, "name", f"{name!r} must be 1-40 lowercase letters, digits or '-', "
                         "starting and ending with a letter or digit (it names Kubernetes objects)")
        namespace = self.string(top.get("namespace"), "namespace", name)
        if isinstance(namespace, str) and "/" in namespace:
            self.problem(top["namespace"].line, "namespace", f"{namespace!r} must not contain '/'")
        model = self.model(top.get("model"))
        hosts = self.hosts(top.get("hosts"))
        host_names = tuple(h.name for h in hosts)
        engine = model.engine if isinstance(model, ModelSpec) else None
        pools = {role: self.pool(top.get(role), role, host_names, hosts, engine) for role in ("prefill", "decode")}
        default_host = host_names[0] if host_names else ""
        router = self.router(top.get("router"), host_names, default_host)
        control_plane = self.control_plane(top.get("control_plane"), host_names, default_host)
        base_port = self.port(top.get("base_port"), "base_port", DEFAULT_BASE_PORT)
        slo = self.slo(top.get("slo"))
        transfer = self.transfer(top.get("transfer"))
        etcd = self.etcd(top.get("etcd"))
        autoscaling = self.autoscaling(top.get("autoscaling"), pools["prefill"], slo)
        security = self.security(top.get("security"))
        if not self.problems:
            self.cross_checks(top, root, model, hosts, pools, router, control_plane, base_port)
        if self.problems:
            raise SpecError(sorted(self.problems, key=lambda p: p.line))
        return Spec(name=name, namespace=namespace, model=model, hosts=tuple(hosts), prefill=pools["prefill"],
                    decode=pools["decode"], router=router, control_plane=control_plane, etcd=tuple(etcd),
                    base_port=base_port, slo=slo, transfer=transfer, autoscaling=autoscaling, security=security)

    def model(self, node: _Node | None) -> Any:
        if node is None:
            return _MISSING
        items = self.mapping(node, "model", (), ("path", "served_name", "engine", "engine_args"))
        if items is None:
            return _MISSING
        engine = self.choice(items.get("engine"), "model.engine", tuple(sorted(ENGINES)), "engine", DEFAULT_ENGINE)
        kind = ENGINES.get(engine) if isinstance(engine, str) else None
        path = self.string(items.get("path"), "model.path", "")
        if path == "" and kind is not None and kind.model_path_field and "path" not in items:
            self.problem(node.line, "model.path", f"missing required field: the {engine} engine needs the "
                         "model's directory or hub id (e.g. path: /models/llama-3-8b)")
        default_served = Path(path).name if isinstance(path, str) and path else (
            kind.default_served_name if kind is not None else "")
        served_name = self.string(items.get("served_name"), "model.served_name", default_served)
        args, extra = self.engine_args(items.get("engine_args"), "model.engine_args",
                                       engine if engine is not _MISSING else None)
        if _MISSING in (engine, path, served_name):
            return _MISSING
        return ModelSpec(path=path, served_name=served_name, engine=engine, engine_args=args,
                         extra_engine_args=extra)

    def engine_args(self, node: _Node | None, path: str, engine: str | None
                    ) -> tuple[dict[str, Scalar], dict[str, Scalar]]:
        if node is None:
            return {}, {}
        allowed = engine_arg_defaults(engine) if engine else {}
        if not isinstance(node.value, dict):
            self.problem(node.line, path, f"expected a mapping of engine arguments, got {_kind(node.value)}")
            return {}, {}
        args: dict[str, Scalar] = {}
        extra: dict[str, Scalar] = {}
        for key, child in node.value.items():
            key_path = self.join(path, str(key))
            if key == "extra":
                extra = self.extra_args(child, key_path)
            elif key in _MODEL_FIELDS:
                self.problem(child.line, key_path, "set by the model section; use model.path / model.served_name")
            elif key in _POOL_FIELDS:
                self.problem(child.line, key_path, f"set by the pool; use prefill.{key} / decode.{key}")
            elif engine is None:
                continue
            elif key not in allowed:
                hint = _suggest(str(key), list(allowed)) or f" (allowed: {', '.join(allowed)}, extra)"
                self.problem(node.key_lines.get(key, child.line), key_path,
                             f"unknown engine argument for {engine}{hint}")
            else:
                value = self.typed(child, key_path, allowed[key])
                if value is not _MISSING:
                    args[key] = value
        return args, extra

    def typed(self, node: _Node, path: str, example: Any) -> Any:
        """A value of the same type as the engine's default for it."""
        value = node.value
        if isinstance(example, bool):
            ok = isinstance(value, bool)
        elif isinstance(example, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(example, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, str)
        if not ok:
            self.problem(node.line, path, f"expected {type(example).__name__} (like the default {example!r}), "
                         f"got {_kind(node.value)}")
            return _MISSING
        return value

    def extra_args(self, node: _Node, path: str) -> dict[str, Scalar]:
        if not isinstance(node.value, dict):
            self.problem(node.line, path, f"expected a mapping of flag name to value, got {_kind(node.value)}")
            return {}
        out: dict[str, Scalar] = {}
        for key, child in node.value.items():
            if not isinstance(child.value, (str, int, float, bool)):
                self.problem(child.line, self.join(path, str(key)),
                             f"expected a string, number or boolean, got {_kind(child.value)}")
            else:
                out[str(key)] = child.value
        return out

    def hosts(self, node: _Node | None) -> list[HostSpec]:
        if node is None:
            return []
        if not isinstance(node.value, list) or not node.value:
            self.problem(node.line, "hosts", f"expected a non-empty list of hosts, got {_kind(node.value)}")
            return []
        hosts: list[HostSpec] = []
        seen: dict[str, int] = {}
        for index, item in enumerate(node.value):
            path = f"hosts[{index}]"
            items = self.mapping(item, path, ("name", "address"), ("gpus", "cpus"))
            if items is None:
                continue
            name = self.string(items.get("name"), f"{path}.name")
            address = self.string(items.get("address"), f"{path}.address")
            gpus = self.integer(items.get("gpus"), f"{path}.gpus", minimum=0, default=0)
            cpus = self.integer(items.get("cpus"), f"{path}.cpus", minimum=0, default=0)
            if isinstance(gpus, int) and gpus > 0 and isinstance(cpus, int) and cpus > 0:
                self.problem(items["cpus"].line, f"{path}.cpus", "cpus splits a CPU host's cores between "
                             "its engine workers; a GPU host's workers run on their GPUs: remove cpus or set "
                             "gpus: 0")
            if isinstance(name, str) and name in seen:
                self.problem(items["name"].line, f"{path}.name",
                             f"host {name!r} is already defined at line {seen[name]}; host names must be unique")
                continue
            if _MISSING not in (name, address, gpus, cpus):
                seen[name] = items["name"].line
                hosts.append(HostSpec(name=name, address=address, gpus=gpus, cpus=cpus))
        return hosts

    def host_ref(self, node: _Node | None, path: str, host_names: tuple[str, ...], default: str) -> Any:
        name = self.string(node, path, default)
        if node is not None and isinstance(name, str) and host_names and name not in host_names:
            self.problem(node.line, path, f"unknown host {name!r}{_suggest(name, host_names)} "
                         f"(hosts: {', '.join(host_names)})")
            return _MISSING
        return name

    def pool(self, node: _Node | None, role: str, host_names: tuple[str, ...], hosts: list[HostSpec],
             engine: str | None) -> Any:
        if node is None:
            return _MISSING
        items = self.mapping(node, role, ("workers",), ("tensor_parallel_size", "hosts", "engine_args"))
        if items is None:
            return _MISSING
        # No prefill workers is an aggregated deployment: decode workers prefill their own prompts.
        workers = self.integer(items.get("workers"), f"{role}.workers", minimum=0 if role == "prefill" else 1)
        tp = self.integer(items.get("tensor_parallel_size"), f"{role}.tensor_parallel_size", minimum=1, default=1)
        if isinstance(tp, int) and not _is_power_of_two(tp):
            lower = 1 << (tp.bit_length() - 1)
            self.problem(items["tensor_parallel_size"].line, f"{role}.tensor_parallel_size",
                         f"must be a power of two (1, 2, 4, 8, ...), got {tp}; try {lower} or {lower * 2}")
            tp = _MISSING
        pool_hosts: Any = host_names
        refs = self.string_list(items.get("hosts"), f"{role}.hosts")
        if refs is not None:
            if not refs and items["hosts"].value == []:
                self.problem(items["hosts"].line, f"{role}.hosts", "must name at least one host "
                             "(or leave it out to use every host)")
            for index, (name, line) in enumerate(refs):
                if host_names and name not in host_names:
                    self.problem(line, f"{role}.hosts[{index}]", f"unknown host {name!r}"
                                 f"{_suggest(name, host_names)} (hosts: {', '.join(host_names)})")
                    pool_hosts = _MISSING
            if pool_hosts is not _MISSING:
                pool_hosts = tuple(dict.fromkeys(name for name, _ in refs))
        elif "hosts" in items:
            pool_hosts = _MISSING
        args, extra = self.engine_args(items.get("engine_args"), f"{role}.engine_args", engine)
        if _MISSING in (workers, tp, pool_hosts) or not pool_hosts:
            return _MISSING
        return PoolSpec(role=role, workers=workers, tensor_parallel_size=tp, hosts=pool_hosts,
                        engine_args=args, extra_engine_args=extra)

    def router(self, node: _Node | None, host_names: tuple[str, ...], default_host: str) -> Any:
        if node is None:
            return RouterSpec(host=default_host)
        items = self.mapping(node, "router", (), ("host", "port", "policy", "disaggregation", "workers"))
        if items is None:
            return _MISSING
        host = self.host_ref(items.get("host"), "router.host", host_names, default_host)
        port = self.port(items.get("port"), "router.port", DEFAULT_ROUTER_PORT)
        policy = self.choice(items.get("policy"), "router.policy", ROUTING_POLICIES, "policy", "kv_aware")
        min_uncached: Any = 0
        if "disaggregation" in items:
            sub = self.mapping(items["disaggregation"], "router.disaggregation", (), ("min_uncached_tokens",))
            if sub is not None:
                min_uncached = self.integer(sub.get("min_uncached_tokens"),
                                            "router.disaggregation.min_uncached_tokens", minimum=0, default=0)
        workers = self.integer(items.get("workers"), "router.workers", minimum=0, default=0)
        if _MISSING in (host, port, policy, min_uncached, workers):
            return _MISSING
        return RouterSpec(host=host, port=port, policy=policy, min_uncached_tokens=min_uncached,
                          workers=workers)

    def control_plane(self, node: _Node | None, host_names: tuple[str, ...], default_host: str) -> Any:
        if node is None:
            return ControlPlaneSpec(host=default_host)
        items = self.mapping(node, "control_plane", (), ("host", "port"))
        if items is None:
            return _MISSING
        host = self.host_ref(items.get("host"), "control_plane.host", host_names, default_host)
        port = self.port(items.get("port"), "control_plane.port", DEFAULT_CONTROL_PLANE_PORT)
        return _MISSING if _MISSING in (host, port) else ControlPlaneSpec(host=host, port=port)

    def slo(self, node: _Node | None) -> Any:
        if node is None:
            return SloSpec()
        items = self.mapping(node, "slo", (), ("ttft_ms", "itl_ms"))
        if items is None:
            return _MISSING
        ttft = self.positive_number(items.get("ttft_ms"), "slo.ttft_ms", None)
        itl = self.positive_number(items.get("itl_ms"), "slo.itl_ms", None)
        return _MISSING if _MISSING in (ttft, itl) else SloSpec(ttft_ms=ttft, itl_ms=itl)

    def autoscaling(self, node: _Node | None, prefill: Any, slo: Any) -> Any:
        if node is None:
            return None
        knobs = {knob.name: knob for knob in tuning_knobs()}
        defaults = AutoscalingSpec(0.0, 0.0).to_dict()
        names = tuple(defaults)
        items = self.mapping(node, "autoscaling", ("decode_requests_per_s",), names[:1] + names[2:])
        if items is None:
            return _MISSING
        values: dict[str, Any] = {}
        for name in names:
            child, path = items.get(name), f"autoscaling.{name}"
            if name in knobs and knobs[name].zero == "never" and child is not None and child.value == 0:
                values[name] = 0.0  # a spec takes 0 only where it means never
            else:
                values[name] = self.positive_number(child, path, defaults[name] or _MISSING)
        for knob in knobs.values():  # a share, e.g. target_utilisation
            value = values[knob.name]
            if knob.at_most is not None and isinstance(value, float) and value > knob.at_most:
                self.problem(items[knob.name].line, f"autoscaling.{knob.name}", f"must be at most "
                             f"{knob.at_most:g} (a share of each worker's rate), got {value:g}")
                values[knob.name] = _MISSING
        if values["prefill_requests_per_s"] is _MISSING and "prefill_requests_per_s" not in items:
            if isinstance(prefill, PoolSpec) and prefill.workers:
                self.problem(node.line, "autoscaling.prefill_requests_per_s", "required with prefill workers: "
                             "what one prefill worker sustains within the objectives (`dynamo-grpc plan` "
                             "prints it)")
            else:  # aggregated: no prefill pool to size
                values["prefill_requests_per_s"] = values["decode_requests_per_s"]
        if isinstance(slo, SloSpec) and (slo.ttft_ms is None or slo.itl_ms is None):
            self.problem(node.line, "autoscaling", "keeps the objectives in `slo`; set both, e.g. "
                         "slo: {ttft_ms: 500, itl_ms: 50}")
        if _MISSING in values.values():
            return _MISSING
        tuning = AutoscalingTuning(**{name: values.pop(name) for name in knobs})
        return AutoscalingSpec(tuning=tuning, **values)

    def transfer(self, node: _Node | None) -> Any:
        if node is None:
            return TransferSpec()
        items = self.mapping(node, "transfer", (), ("kv_ttl_s", "on_pull_failure"))
        if items is None:
            return _MISSING
        ttl = self.positive_number(items.get("kv_ttl_s"), "transfer.kv_ttl_s", 30.0)
        on_failure = self.string(items.get("on_pull_failure"), "transfer.on_pull_failure", "fail")
        if isinstance(on_failure, str) and on_failure not in KV_PULL_FAILURE_POLICIES:
            self.problem(items["on_pull_failure"].line, "transfer.on_pull_failure",
                         f"must be one of {', '.join(KV_PULL_FAILURE_POLICIES)}, got {on_failure!r}"
                         f"{_suggest(on_failure, KV_PULL_FAILURE_POLICIES)}")
            on_failure = _MISSING
        return _MISSING if _MISSING in (ttl, on_failure) else TransferSpec(kv_ttl_s=ttl, on_pull_failure=on_failure)

    def security(self, node: _Node | None) -> Any:
        if node is None:
            return SecuritySpec()
        names = tuple(f.name for f in fields(SecuritySpec))
        items = self.mapping(node, "security", (), names)
        if items is None:
            return _MISSING
        values = {name: self.string(items.get(name), f"security.{name}", "") for name in names}
        if _MISSING in values.values():
            return _MISSING
        if bool(values["tls_cert"]) != bool(values["tls_key"]):
            self.problem(node.line, "security", "tls_cert and tls_key go together")
        elif values["tls_ca"] and not values["tls_cert"]:
            self.problem(node.line, "security.tls_ca", "needs tls_cert and tls_key: with mutual TLS every "
                         "process presents its own certificate")
        return SecuritySpec(**values)

    def etcd(self, node: _Node | None) -> list[str]:
        endpoints = self.string_list(node, "etcd")
        if endpoints is None:
            return []
        if not endpoints and node is not None and node.value == []:
            self.problem(node.line, "etcd", "must list at least one endpoint, e.g. [10.0.0.1:2379]")
        for index, (endpoint, line) in enumerate(endpoints):
            host, _, port = endpoint.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                self.problem(line, f"etcd[{index}]", f"expected host:port, got {endpoint!r} "
                             f"(e.g. {endpoint.split(':')[0] or '10.0.0.1'}:2379)")
        return [endpoint for endpoint, _ in endpoints]

    # Checks across sections, run once every section is well-formed.

    def cross_checks(self, top: dict[str, _Node], root: _Node, model: ModelSpec, hosts: list[HostSpec],
                     pools: dict[str, PoolSpec], router: RouterSpec, control_plane: ControlPlaneSpec,
                     base_port: int) -> None:
        prefill, decode = pools["prefill"], pools["decode"]
        self.engine_configs(top, model, pools)
        if prefill.workers and prefill.tensor_parallel_size != decode.tensor_parallel_size:
            node = top["decode"].value.get("tensor_parallel_size", top["decode"])
            self.problem(node.line, "decode.tensor_parallel_size",
                         f"{decode.tensor_parallel_size} differs from prefill.tensor_parallel_size "
                         f"({prefill.tensor_parallel_size}); KV moves only between engines with one layout, "
                         "so use the same value in both pools")
        defaults = engine_arg_defaults(model.engine)
        merged = {role: {**defaults, **model.engine_args, **pool.engine_args} for role, pool in pools.items()}
        for arg in ENGINES[model.engine].kv_layout_args:
            if prefill.workers and merged["prefill"][arg] != merged["decode"][arg]:
                node = top["decode"].value.get("engine_args", top["decode"])
                self.problem(node.line, f"decode.engine_args.{arg}",
                             f"{merged['decode'][arg]!r} differs from prefill's {merged['prefill'][arg]!r}; "
                             f"KV moves only between engines with one layout, so set {arg} under "
                             "model.engine_args")
        self.devices(top, hosts, pools)
        self.ports(top, root, hosts, pools, router, control_plane, base_port)

    def engine_configs(self, top: dict[str, _Node], model: ModelSpec, pools: dict[str, PoolSpec]) -> None:
        """Let the engine's own config check the values (ranges it knows best)."""
        for role, pool in pools.items():
            kind = ENGINES[model.engine]
            tp = {"tensor_parallel_size": pool.tensor_parallel_size} if kind.takes_tensor_parallel else {}
            try:
                kind.config(**{**model.engine_args, **pool.engine_args, **tp})
            except (ValueError, TypeError) as error:
                node = top[role].value.get("engine_args") or top["model"].value.get("engine_args") or top[role]
                self.problem(node.line, f"{role}.engine_args", str(error))

    def devices(self, top: dict[str, _Node], hosts: list[HostSpec], pools: dict[str, PoolSpec]) -> None:
        for index, host in enumerate(hosts):
            demand = []
            for role, pool in pools.items():
                count = pool_placement(pool).count(host.name)
                if count:
                    demand.append((role, count, pool.tensor_parallel_size))
            needed = sum(count * tp for _, count, tp in demand)
            host_node = top["hosts"].value[index]
            line = host_node.value.get("gpus", host_node).line
            if host.gpus == 0:
                for role, _, tp in demand:
                    if tp > 1:
                        self.problem(top[role].value.get("tensor_parallel_size", top[role]).line,
                                     f"{role}.tensor_parallel_size", f"{tp} needs GPUs, but host {host.name!r} "
                                     "has none (gpus: 0 is a CPU host); use 1 or give the host GPUs")
            elif needed > host.gpus:
                parts = " + ".join(f"{role} {count} x TP {tp}" for role, count, tp in demand)
                self.problem(line, f"hosts[{index}].gpus",
                             f"host {host.name!r} has {host.gpus} GPUs but its workers need {needed} ({parts}); "
                             "lower workers or tensor_parallel_size, or add hosts to the pools")

    def ports(self, top: dict[str, _Node], root: _Node, hosts: list[HostSpec], pools: dict[str, PoolSpec],
              router: RouterSpec, control_plane: ControlPlaneSpec, base_port: int) -> None:
        if router.host == control_plane.host and router.port == control_plane.port:
            line = top["control_plane"].value.get("port", top["control_plane"]).line
            self.problem(line, "control_plane.port", f"port {control_plane.port} on host {router.host!r} is "
                         f"already router.port; pick another, e.g. {control_plane.port + 1}")
        for host in hosts:
            workers = sum(pool_placement(pool).count(host.name) for pool in pools.values())
            fixed = {p for h, p in ((router.host, router.port), (control_plane.host, control_plane.port))
                     if h == host.name}
            last = base_port + workers - 1 + len({p for p in fixed if p >= base_port})
            if workers and last > 65535:
                line = top["base_port"].line if "base_port" in top else root.line
                self.problem(line, "base_port", f"{host.name!r} needs {workers} worker ports from {base_port}, "
                             f"past 65535; use a base_port of at most {65535 - workers + 1 - len(fixed)}")
