"""Per-role configuration: frozen dataclasses filled from `--flags`, each with a DYNAMO_GRPC_* env var.

Validation happens once, at start-up, and every message names the flag to change.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from dynamo_grpc.engine.registry import DEFAULT_ENGINE, ENGINES, EngineKind, kind_of
from dynamo_grpc.kv.handle_key import KEY_ENV, KvKey, load_kv_key
from dynamo_grpc.kv.nixl_transport import DEFAULT_NIXL_MIN_BYTES, nixl_installed
from dynamo_grpc.kv.transport import DEFAULT_PULL_MIN_MIB_S, DEFAULT_PULL_TIMEOUT_S
from dynamo_grpc.registry.access import PASSWORD_ENV, EtcdAccess, EtcdAccessError, read_password
from dynamo_grpc.routing.policies import POLICIES
from dynamo_grpc.security import Tls, read_token
from dynamo_grpc.tiny_model import DEFAULT_MODEL_DIR

EngineConfig = Any
"""One of the engines' config dataclasses (`EngineKind.config`)."""
KV_PULL_FAILURE_POLICIES = ("fail", "local-prefill")
KV_TRANSPORTS = ("shm", "nixl", "grpc")
DEFAULT_STREAM_INTERVAL_MS = 10.0
MAX_STREAM_INTERVAL_MS = 1000.0
ROUTING_POLICIES = tuple(POLICIES)


class ConfigError(ValueError):
    """A bad flag or environment variable; the message says which and what is allowed."""


@dataclass(frozen=True)
class ServerConfig:
    """Where a role listens, how others reach it, and where it registers."""

    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str = ""
    node_name: str = field(default_factory=socket.gethostname)
    etcd: tuple[str, ...] = ()
    namespace: str = "default"
    lease_ttl_s: int = 10
    metrics_port: int = 0
    """Where this process serves Prometheus /metrics over HTTP; 0: not served (an HTTP frontend serves its
    own /metrics on its port either way)."""
    etcd_access: EtcdAccess = field(default_factory=EtcdAccess)
    """TLS and credentials for etcd (`--etcd-ca`, `--etcd-user`, ...)."""
    tls: Tls | None = None
    """This process's TLS: its servers' certificate (requiring client certificates where it names a CA),
    and what its own channels trust and present; None: plaintext."""
    auth_token: str | None = field(default=None, repr=False)
    """The bearer token a router or HTTP frontend requires of its callers; None: none required."""
    reflection: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in [0, 65535] (0 picks a free port), got {self.port}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port must be in [0, 65535] (0: no metrics server), "
                              f"got {self.metrics_port}")
        if self.metrics_port and self.metrics_port == self.port:
            raise ConfigError(f"--metrics-port must differ from --port ({self.port}); pick another")
        if self.lease_ttl_s < 2:
            raise ConfigError(f"--lease-ttl-s must be at least 2 (etcd's minimum lease), got {self.lease_ttl_s}")
        for endpoint in self.etcd:
            host, _, port = endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"--etcd expects host:port[,host:port...], got {endpoint!r}")
        if not self.namespace or "/" in self.namespace:
            raise ConfigError(f"--namespace must be non-empty and contain no '/', got {self.namespace!r}")

    def endpoint(self, port: int) -> str:
        """The address other processes use to reach a server bound on `port`."""
        host = self.advertise_host or (self.host if self.host not in ("0.0.0.0", "::", "") else self.node_name)
        return f"{host}:{port}"


@dataclass(frozen=True)
class EndpointPickerConfig:
    """A router's endpoint picker for Envoy-based gateways (`services/endpoint_picker.py`)."""

    port: int
    """Where it serves Envoy's External Processing API (`--ext-proc-port`)."""
    target_port: int = 8000
    """The port of the OpenAI frontend beside each decode worker, where the gateway sends a request."""

    def __post_init__(self) -> None:
        for flag, port in (("--ext-proc-port", self.port), ("--ext-proc-target-port", self.target_port)):
            if not 1 <= port <= 65535:
                raise ConfigError(f"{flag} must be in [1, 65535], got {port}")


@dataclass(frozen=True)
class WorkerConfig:
    """A prefill or decode worker."""

    server: ServerConfig
    engine: EngineConfig
    worker_id: str = ""
    kv_ttl_s: float = 30.0
    kv_pull_failure: str = "fail"
    kv_transports: tuple[str, ...] = ()
    """KV transports the worker offers (prefill) or receives by (decode); empty: all this host has."""
    nixl_min_bytes: int = DEFAULT_NIXL_MIN_BYTES
    """A prefill worker offers NIXL for transfers at least this large; smaller ones move by shm or gRPC."""
    stream_interval_ms: float = DEFAULT_STREAM_INTERVAL_MS
    """A decode stream sends its first tokens at once, then gathers tokens for this long per message."""
    kv_key: KvKey | None = None
    """The deployment's key for KV handles: a prefill worker signs with it, a decode worker takes only
    handles signed with it. None: unsigned and unchecked."""
    kv_held_fraction: float = 0.75
    """A prefill worker: the share of its KV pool that unpulled transfers may hold, all callers together."""
    kv_caller_fraction: float = 0.5
    """A prefill worker: the share of its KV pool that unpulled transfers handed to one caller may hold."""
    kv_pull_timeout_s: float = DEFAULT_PULL_TIMEOUT_S
    kv_pull_min_mib_s: float = DEFAULT_PULL_MIN_MIB_S
    """A decode worker: a KV pull must end within kv_pull_timeout_s plus its bytes at this rate."""

    def __post_init__(self) -> None:
        if self.kv_ttl_s <= 0:
            raise ConfigError(f"--kv-ttl-s must be positive, got {self.kv_ttl_s}")
        for flag, fraction in (("--kv-held-fraction", self.kv_held_fraction),
                               ("--kv-caller-fraction", self.kv_caller_fraction)):
            if not 0 < fraction <= 1:
                raise ConfigError(f"{flag} must be in (0, 1], got {fraction}")
        for flag, value in (("--kv-pull-timeout-s", self.kv_pull_timeout_s),
                            ("--kv-pull-min-mib-s", self.kv_pull_min_mib_s)):
            if value <= 0:
                raise ConfigError(f"{flag} must be positive, got {value}")
        unknown = [name for name in self.kv_transports if name not in KV_TRANSPORTS]
        if unknown:
            raise ConfigError(f"--kv-transports takes {', '.join(KV_TRANSPORTS)}; got {', '.join(unknown)}")
        if "nixl" in self.kv_transports and not nixl_installed():
            raise ConfigError("--kv-transports nixl needs the nixl package: pip install 'dynamo-grpc[nixl]'")
        if self.nixl_min_bytes < 0:
            raise ConfigError(f"--nixl-min-bytes must be at least 0, got {self.nixl_min_bytes}")
        if not 0 <= self.stream_interval_ms <= MAX_STREAM_INTERVAL_MS:
            raise ConfigError(f"--stream-interval-ms must be in [0, {MAX_STREAM_INTERVAL_MS}], "
                              f"got {self.stream_interval_ms}")
        if self.kv_pull_failure not in KV_PULL_FAILURE_POLICIES:
            raise ConfigError(f"--kv-pull-failure must be one of {', '.join(KV_PULL_FAILURE_POLICIES)}, "
                              f"got {self.kv_pull_failure!r}")

    @property
    def kind(self) -> EngineKind:
        """Which engine `engine` configures."""
        return kind_of(self.engine)

    @property
    def resolved_kv_transports(self) -> tuple[str, ...]:
        """The transports asked for, or every one this host has: nixl where the package is installed."""
        if self.kv_transports:
            return tuple(name for name in KV_TRANSPORTS if name in self.kv_transports)
        return tuple(name for name in KV_TRANSPORTS if name != "nixl" or nixl_installed())

    def resolved_worker_id(self, role: str) -> str:
        return self.worker_id or f"{role}-{self.server.node_name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def env_default(name: str, default: Any) -> Any:
    """The DYNAMO_GRPC_<NAME> variable for flag --<name>, or the built-in default."""
    var = "DYNAMO_GRPC_" + name.upper().replace("-", "_")
    return os.environ.get(var, default)


def add_flag(parser: argparse.ArgumentParser, name: str, *, default: Any, help: str, **kwargs: Any) -> None:
    var = "DYNAMO_GRPC_" + name.upper().replace("-", "_")
    shown = "" if default is None else f"; default {default}"
    parser.add_argument(f"--{name}", default=env_default(name, default), help=f"{help} [env {var}{shown}]", **kwargs)


def _flag_type(example: Any) -> Callable[[str], Any]:
    if isinstance(example, bool):
        return lambda text: {"true": True, "1": True, "false": False, "0": False}[text.lower()]
    return type(example)


def add_server_flags(parser: argparse.ArgumentParser, *, port: int = 0) -> None:
    add_flag(parser, "host", default="127.0.0.1", help="address to listen on")
    add_flag(parser, "port", default=port, type=int, help="port to listen on (0 = any free port)")
    add_flag(parser, "advertise-host", default="", help="host name others use to reach this process")
    add_flag(parser, "node-name", default=socket.gethostname(), help="this host's name, for same-host pairing")
    add_flag(parser, "etcd", default="", help="etcd endpoints host:port[,host:port...]")
    add_etcd_access_flags(parser)
    add_flag(parser, "namespace", default="default", help="deployment namespace in etcd")
    add_flag(parser, "lease-ttl-s", default=10, type=int, help="etcd lease TTL of this process's registration")
    add_flag(parser, "metrics-port", default=0, type=int, help="serve Prometheus metrics at "
             "http://HOST:PORT/metrics (0: not served; an HTTP frontend serves /metrics on its own port)")
    add_tls_flags(parser)


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "tls-cert", default="", help="PEM certificate chain this process serves with and presents "
             "to the servers it calls; with --tls-key, TLS on every port and channel (default: plaintext)")
    add_flag(parser, "tls-key", default="", help="PEM private key of --tls-cert")
    add_flag(parser, "tls-ca", default="", help="PEM CA this process trusts: its gRPC servers then require "
             "client certificates the CA signed (mutual TLS), and its channels trust only servers it signed")
    parser.add_argument("--no-reflection", action="store_true",
                        default=env_default("no-reflection", "").lower() in ("1", "true"),
                        help="do not serve gRPC reflection [env DYNAMO_GRPC_NO_REFLECTION]")


def add_token_flag(parser: argparse.ArgumentParser, *, what: str) -> None:
    add_flag(parser, "auth-token-file", default="", help=f"file holding the bearer token {what} requires "
             f"(env {TOKEN_ENV} may hold the token itself; default: no token required)")


TOKEN_ENV = "DYNAMO_GRPC_AUTH_TOKEN"


def add_etcd_access_flags(parser: argparse.ArgumentParser) -> None:
    """TLS and credentials for etcd; the password comes from a file or the environment, never a flag."""
    add_flag(parser, "etcd-ca", default="", help="CA certificate (PEM) that signed etcd's; given, etcd is "
             "reached over TLS")
    add_flag(parser, "etcd-cert", default="", help="client certificate (PEM) for an etcd run with "
             "--client-cert-auth (needs --etcd-ca and --etcd-key)")
    add_flag(parser, "etcd-key", default="", help="private key (PEM) of --etcd-cert")
    add_flag(parser, "etcd-user", default="", help="etcd user to authenticate as; its roles decide what this "
             "process may write (docs/security.md)")
    add_flag(parser, "etcd-password-file", default="", help=f"file whose first line is --etcd-user's password "
             f"(or set {PASSWORD_ENV})")


def etcd_access(args: argparse.Namespace) -> EtcdAccess:
    try:
        password = (read_password(args.etcd_password_file) if args.etcd_password_file
                    else os.environ.get(PASSWORD_ENV, ""))
        return EtcdAccess(ca=args.etcd_ca, cert=args.etcd_cert, key=args.etcd_key, user=args.etcd_user,
                          password=password)
    except EtcdAccessError as error:
        raise ConfigError(str(error)) from None


def _own_flag_fields(kind: EngineKind) -> list[str]:
    """The engine's arguments that have a worker flag of their own (not the served name, set by --model,
    nor the passthrough's pairs)."""
    passthrough = kind.passthrough.field if kind.passthrough else ""
    return [name for name in kind.argument_names if name not in (kind.served_name_field, passthrough)]


def _engine_fields() -> dict[str, list[tuple[str, Any]]]:
    """Each engine setting that has a flag -> the engines using it, with their defaults."""
    settings: dict[str, list[tuple[str, Any]]] = {}
    for kind in ENGINES.values():
        defaults = {f.name: f.default for f in fields(kind.config)}
        for name in _own_flag_fields(kind):
            settings.setdefault(name, []).append((kind.name, defaults[name]))
    return settings


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "engine", default=DEFAULT_ENGINE, choices=sorted(ENGINES),
             help="inference engine: " + "; ".join(f"{kind.name}: {kind.summary}" for kind in ENGINES.values()))
    add_flag(parser, "model", default="", help="served model name (default: the model directory's name, or "
             "the engine's own default)")
    for name, users in _engine_fields().items():
        defaults = "; ".join(f"{kind} {default}" for kind, default in users)
        add_flag(parser, name.replace("_", "-"), default=None, type=_flag_type(users[0][1]),
                 help=f"{' and '.join(kind for kind, _ in users)} engine: {name.replace('_', ' ')} ({defaults})")
    for kind in ENGINES.values():
        if kind.passthrough is not None:
            parser.add_argument(f"--{kind.passthrough.flag}", action="append", default=[], metavar="KEY=VALUE",
                                help=f"{kind.name} engine: {kind.passthrough.help}")
    add_flag(parser, "worker-id", default="", help="unique worker id (default: role-node-pid-random)")
    add_flag(parser, "kv-ttl-s", default=30.0, type=float, help="seconds a prefill holds unpulled KV")
    add_flag(parser, "kv-pull-failure", default="fail", choices=KV_PULL_FAILURE_POLICIES,
             help="decode worker, when pulling a prompt's KV fails: fail the request, or prefill it locally")
    add_flag(parser, "kv-transports", default="",
             help="KV transports this worker offers (prefill) or receives by (decode), comma-separated among "
             f"{', '.join(KV_TRANSPORTS)} (default: all; nixl where the nixl package is installed)")
    add_flag(parser, "kv-key-file", default="",
             help=f"file holding the deployment's KV key (hex, at least 32 bytes): prefill workers sign KV handles "
             f"with it, decode workers take only handles signed with it (default: the key in env {KEY_ENV} as hex; "
             "none: handles are neither signed nor checked; `serve` makes one)")
    add_flag(parser, "kv-held-fraction", default=0.75, type=float,
             help="prefill worker: share of its KV pool that unpulled KV transfers may hold, all callers together")
    add_flag(parser, "kv-caller-fraction", default=0.5, type=float,
             help="prefill worker: share of its KV pool that unpulled KV transfers handed to one caller (a gRPC "
             "connection) may hold; over it, Prefill is RESOURCE_EXHAUSTED (KV_HELD_LIMIT)")
    add_flag(parser, "kv-pull-timeout-s", default=DEFAULT_PULL_TIMEOUT_S, type=float,
             help="decode worker: a KV pull (connecting, moving, releasing) must end within this many seconds "
             "plus the time its bytes take at --kv-pull-min-mib-s, else DEADLINE_EXCEEDED (KV_PULL_TIMEOUT)")
    add_flag(parser, "kv-pull-min-mib-s", default=DEFAULT_PULL_MIN_MIB_S, type=float,
             help="decode worker: the slowest KV transfer rate (MiB/s) a pull's deadline allows for")
    add_flag(parser, "nixl-min-bytes", default=DEFAULT_NIXL_MIN_BYTES, type=int,
             help="prefill worker: offer NIXL only for KV transfers of at least this many bytes; below it, "
             "registering memory and the READ's set-up cost more than a gRPC pull (0: always)")
    add_flag(parser, "stream-interval-ms", default=DEFAULT_STREAM_INTERVAL_MS, type=float,
             help="decode worker: after a request's first tokens (sent at once), send its tokens at most this "
             "often, gathered into one message (its last at once; 0: send each step's tokens when ready)")


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(host=args.host, port=args.port, advertise_host=args.advertise_host,
                        node_name=args.node_name, etcd=tuple(e for e in args.etcd.split(",") if e),
                        etcd_access=etcd_access(args), namespace=args.namespace, lease_ttl_s=args.lease_ttl_s,
                        metrics_port=args.metrics_port, tls=tls_config(args), auth_token=auth_token(args),
                        reflection=not args.no_reflection)


def tls_config(args: argparse.Namespace) -> Tls | None:
    """The TLS of `--tls-cert/--tls-key/--tls-ca`, checked now (readable, a key that matches its certificate),
    or None without them."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if not args.tls_cert:
        if args.tls_ca:
            raise ConfigError("--tls-ca needs --tls-cert and --tls-key: with mutual TLS this process presents "
                              "its own certificate to the servers it calls")
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"--tls-cert {args.tls_cert} / --tls-key {args.tls_key}: "
                          f"{_ssl_problem(error, 'a PEM certificate chain and its private key')}") from None
    if args.tls_ca:
        try:
            context.load_verify_locations(args.tls_ca)
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f"--tls-ca {args.tls_ca}: {_ssl_problem(error, 'a PEM CA certificate')}") from None
    return Tls(root_certificates=args.tls_ca or None, certificate_chain=args.tls_cert, private_key=args.tls_key)


def _ssl_problem(error: OSError, expected: str) -> str:
    if isinstance(error, ssl.SSLError):
        return f"not {expected} ({error.reason or error})"
    return error.strerror or str(error)


def auth_token(args: argparse.Namespace) -> str | None:
    """The bearer token of `--auth-token-file`, else of the TOKEN_ENV variable; None for neither, or for a
    role without the flag."""
    if not hasattr(args, "auth_token_file"):
        return None
    if args.auth_token_file:
        try:
            return read_token(args.auth_token_file, "--auth-token-file")
        except ValueError as error:
            raise ConfigError(str(error)) from None
    return os.environ.get(TOKEN_ENV) or None


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    kind = ENGINES[args.engine]
    chosen = {name: getattr(args, name) for name in _own_flag_fields(kind) if getattr(args, name) is not None}
    if kind.model_path_field and not chosen.get(kind.model_path_field):
        chosen[kind.model_path_field] = str(DEFAULT_MODEL_DIR)  # the tiny local model, built on first use
    if args.model:
        chosen[kind.served_name_field] = args.model
    for other in ENGINES.values():
        if other.passthrough is None or not getattr(args, other.passthrough.flag.replace("-", "_"), None):
            continue
        pairs = tuple(getattr(args, other.passthrough.flag.replace("-", "_")))
        if other is not kind:
            raise ConfigError(f"--{other.passthrough.flag} does not apply to --engine {args.engine}")
        try:
            other.passthrough.check(pairs)  # refuse a bad one now, not half a minute into start-up
        except ValueError as error:
            raise ConfigError(str(error)) from None
        chosen[other.passthrough.field] = pairs
    unused = [f"--{name.replace('_', '-')}" for name in _engine_fields()
              if name not in chosen and getattr(args, name, None) is not None]
    if unused:
        verb = "does" if len(unused) == 1 else "do"
        raise ConfigError(f"{', '.join(unused)} {verb} not apply to --engine {args.engine}")
    try:
        engine = kind.config(**chosen)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    try:
        kv_key = load_kv_key(args.kv_key_file)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--kv-key-file {args.kv_key_file or f'(env {KEY_ENV})'}: {error}") from None
    return WorkerConfig(server=server_config(args), engine=engine, worker_id=args.worker_id, kv_ttl_s=args.kv_ttl_s,
                        kv_pull_failure=args.kv_pull_failure, stream_interval_ms=args.stream_interval_ms,
                        kv_key=kv_key, kv_held_fraction=args.kv_held_fraction,
                        kv_caller_fraction=args.kv_caller_fraction, kv_pull_timeout_s=args.kv_pull_timeout_s,
                        kv_pull_min_mib_s=args.kv_pull_min_mib_s,
                        nixl_min_bytes=args.nixl_min_bytes,
                        kv_transports=tuple(name.strip() for name in args.kv_transports.split(",")
                                            if name.strip()))
