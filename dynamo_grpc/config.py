"""Per-role configuration: frozen dataclasses filled from `--flags`, each with a DYNAMO_GRPC_* env var.

Validation happens once, at start-up, and every message names the flag to change.
"""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

from dynamo_grpc.engine.simulated import SimulatedEngineConfig


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

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in [0, 65535] (0 picks a free port), got {self.port}")
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
class WorkerConfig:
    """A prefill or decode worker."""

    server: ServerConfig
    engine: SimulatedEngineConfig
    worker_id: str = ""
    kv_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        if self.kv_ttl_s <= 0:
            raise ConfigError(f"--kv-ttl-s must be positive, got {self.kv_ttl_s}")

    def resolved_worker_id(self, role: str) -> str:
        return self.worker_id or f"{role}-{self.server.node_name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def env_default(name: str, default: Any) -> Any:
    """The DYNAMO_GRPC_<NAME> variable for flag --<name>, or the built-in default."""
    var = "DYNAMO_GRPC_" + name.upper().replace("-", "_")
    return os.environ.get(var, default)


def add_flag(parser: argparse.ArgumentParser, name: str, *, default: Any, help: str, **kwargs: Any) -> None:
    var = "DYNAMO_GRPC_" + name.upper().replace("-", "_")
    parser.add_argument(f"--{name}", default=env_default(name, default), help=f"{help} [env {var}; default {default}]",
                        **kwargs)


def add_server_flags(parser: argparse.ArgumentParser, *, port: int = 0) -> None:
    add_flag(parser, "host", default="127.0.0.1", help="address to listen on")
    add_flag(parser, "port", default=port, type=int, help="port to listen on (0 = any free port)")
    add_flag(parser, "advertise-host", default="", help="host name others use to reach this process")
    add_flag(parser, "node-name", default=socket.gethostname(), help="this host's name, for same-host pairing")
    add_flag(parser, "etcd", default="", help="etcd endpoints host:port[,host:port...]")
    add_flag(parser, "namespace", default="default", help="deployment namespace in etcd")
    add_flag(parser, "lease-ttl-s", default=10, type=int, help="etcd lease TTL of this process's registration")


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    base = SimulatedEngineConfig()
    add_flag(parser, "model", default=base.model, help="served model name")
    for f in fields(SimulatedEngineConfig):
        if f.name != "model":
            add_flag(parser, f.name.replace("_", "-"), default=getattr(base, f.name), type=type(getattr(base, f.name)),
                     help=f"simulated engine: {f.name.replace('_', ' ')}")
    add_flag(parser, "worker-id", default="", help="unique worker id (default: role-node-pid-random)")
    add_flag(parser, "kv-ttl-s", default=30.0, type=float, help="seconds a prefill holds unpulled KV")


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(host=args.host, port=args.port, advertise_host=args.advertise_host,
                        node_name=args.node_name, etcd=tuple(e for e in args.etcd.split(",") if e),
                        namespace=args.namespace, lease_ttl_s=args.lease_ttl_s)


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    try:
        engine = SimulatedEngineConfig(**{f.name: getattr(args, f.name) for f in fields(SimulatedEngineConfig)})
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return WorkerConfig(server=server_config(args), engine=engine, worker_id=args.worker_id, kv_ttl_s=args.kv_ttl_s)
