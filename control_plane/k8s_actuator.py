"""Autoscaling on Kubernetes: set each worker pool's Deployment replicas from the control plane's scale
target.

On hosts `dynamo-grpc up` follows the `ScaleTarget` in etcd; in a cluster `dynamo-grpc k8s-actuator` does,
through the scale subresource of the pools' Deployments (all its Role allows: get and patch of
`deployments/scale`, by name). The control plane stays free of the cluster: it decides and publishes,
this acts, and only this holds the permission.

It keeps the latest target and applies it when the target changes, every `resync_s` (so a `kubectl scale`
or a manifest applied again is undone), and `retry_s` after a failed call. A pool never gets more replicas
than the plan's workers, whatever the target says; with no target in etcd (not yet published, or lost with
etcd's data) the replicas stay as they are. When a pool shrinks Kubernetes picks the pods that go; each
gets SIGTERM and drains like a worker `up` stops (deregister, finish in-flight calls).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dynamo_grpc.config import ConfigError, add_etcd_access_flags, add_flag, etcd_access
from dynamo_grpc.registry import SCALE_DOCUMENT, EtcdAccess, EtcdRegistry
from dynamo_grpc.services.server import start_server
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb

if TYPE_CHECKING:
    from kubernetes.client import AppsV1Api

log = logging.getLogger(__name__)

POOLS = ("prefill", "decode")


@dataclass(frozen=True)
class PoolDeployment:
    """A worker pool's Deployment and the most replicas the plan gives it."""

    role: str
    deployment: str
    most: int


@dataclass(frozen=True)
class ActuatorConfig:
    """What `dynamo-grpc k8s-actuator` follows (etcd) and what it sets (Deployments in one namespace)."""

    etcd: tuple[str, ...]
    namespace: str
    """The deployment's namespace in etcd, where the control plane publishes the target."""
    k8s_namespace: str
    pools: tuple[PoolDeployment, ...]
    resync_s: float = 30.0
    retry_s: float = 2.0
    request_timeout_s: float = 10.0
    etcd_access: EtcdAccess = field(default_factory=EtcdAccess)

    def __post_init__(self) -> None:
        problems = []
        if not self.etcd:
            problems.append("--etcd must name the etcd the control plane publishes to (host:port[,...])")
        if not self.pools:
            problems.append("name at least one pool: --prefill-deployment or --decode-deployment")
        problems += [f"--max-{pool.role} must be positive for --{pool.role}-deployment {pool.deployment}"
                     for pool in self.pools if pool.most <= 0]
        problems += [f"--{name} must be positive" for name, value in (
            ("resync-s", self.resync_s), ("retry-s", self.retry_s)) if value <= 0]
        if problems:
            raise ConfigError("; ".join(problems))


def requested(target: cp_pb.ScaleTarget, pool: PoolDeployment) -> int:
    return target.prefill_workers if pool.role == "prefill" else target.decode_workers


def wanted_replicas(target: cp_pb.ScaleTarget, pool: PoolDeployment) -> int:
    """The target's workers for this pool, never more than the plan's."""
    return min(requested(target, pool), pool.most)


class ReplicaActuator:
    """Follows the scale target in etcd and keeps the pools' Deployments at it."""

    def __init__(self, config: ActuatorConfig, apps: AppsV1Api) -> None:
        self._config = config
        self._apps = apps
        self.target: cp_pb.ScaleTarget | None = None
        self._wake = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Act on every target until `stop` is set."""
        following = asyncio.create_task(self._follow_target())
        stopping = asyncio.create_task(self._wake_on(stop))
        try:
            while not stop.is_set():
                # 1) Take the latest target (a change while applying wakes the loop again).
                self._wake.clear()
                target = self.target
                # 2) Apply it; after a failure try again soon, else check again at the next resync.
                done = target is None or await self._apply(target)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(),
                                           self._config.resync_s if done else self._config.retry_s)
        finally:
            for task in (following, stopping):
                task.cancel()
            await asyncio.gather(following, stopping, return_exceptions=True)

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _follow_target(self) -> None:
        """Keep `target` current; reconnect while etcd is away."""
        config = self._config
        while True:
            registry = EtcdRegistry(list(config.etcd), namespace=config.namespace, access=config.etcd_access)
            try:
                await registry.connect()
                async for data in registry.watch_document(SCALE_DOCUMENT):
                    if data:
                        self._take(cp_pb.ScaleTarget.FromString(data))
                    else:
                        log.warning("no scale target in etcd (namespace %s) yet; the Deployments keep their "
                                    "replicas", config.namespace)
            except Exception as error:  # noqa: BLE001 - keep following once etcd is back
                log.warning("cannot follow the scale target in etcd at %s (%s); retrying in %g s",
                            ",".join(config.etcd), error, config.retry_s)
            finally:
                await registry.close()
            await asyncio.sleep(config.retry_s)

    def _take(self, target: cp_pb.ScaleTarget) -> None:
        log.info("scale target v%d: %d prefill, %d decode workers (%s)", target.version,
                 target.prefill_workers, target.decode_workers, target.reason or "-")
        for pool in self._config.pools:
            if requested(target, pool) > pool.most:
                log.warning("scale target v%d asks for more %s workers than the plan's %d; %s stays at %d",
                            target.version, pool.role, pool.most, pool.deployment, pool.most)
        self.target = target
        self._wake.set()

    async def _apply(self, target: cp_pb.ScaleTarget) -> bool:
        """Set every pool's replicas; True when all of them are at the target."""
        done = True
        for pool in self._config.pools:
            try:
                await self._scale(pool, wanted_replicas(target, pool), target)
            except Exception as error:  # noqa: BLE001 - one failed call must not end autoscaling
                done = False
                log.warning("cannot scale Deployment %s to the target: %s; trying again in %g s",
                            pool.deployment, _describe(error, pool.deployment, self._config.k8s_namespace),
                            self._config.retry_s)
        return done

    async def _scale(self, pool: PoolDeployment, replicas: int, target: cp_pb.ScaleTarget) -> None:
        namespace, timeout = self._config.k8s_namespace, self._config.request_timeout_s
        scale = await asyncio.to_thread(self._apps.read_namespaced_deployment_scale, pool.deployment,
                                        namespace, _request_timeout=timeout)
        if scale.spec is not None and scale.spec.replicas == replicas:
            return
        # An object body goes as a strategic merge patch: only spec.replicas changes.
        await asyncio.to_thread(self._apps.patch_namespaced_deployment_scale, pool.deployment, namespace,
                                {"spec": {"replicas": replicas}}, _request_timeout=timeout)
        was = scale.spec.replicas if scale.spec is not None else None
        log.info("scaled Deployment %s from %s to %d replicas (target v%d: %s)", pool.deployment, was,
                 replicas, target.version, target.reason or "-")


def _describe(error: Exception, deployment: str, namespace: str) -> str:
    """An API server's refusal in words an operator can act on."""
    status = getattr(error, "status", None)
    if status == 403:
        return (f"forbidden (403): the actuator's Role must allow get and patch on deployments/scale "
                f"{deployment} in namespace {namespace} (k8s-actuator.yaml)")
    if status == 404:
        return f"not found (404) in namespace {namespace}: apply the pool's manifest"
    if status is not None:
        return f"{status} {getattr(error, 'reason', '')}".strip()
    return f"{type(error).__name__}: {error}"


def apps_api(kubeconfig: str = "") -> AppsV1Api:
    """The AppsV1 API of the cluster this runs in (its ServiceAccount), or of a kubeconfig."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise ConfigError("the kubernetes client is not installed: pip install 'dynamo-grpc[k8s]'") from None
    try:
        if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            return client.AppsV1Api(client.ApiClient(configuration))
        api_client = config.new_client_from_config(config_file=kubeconfig or None, persist_config=False)
        return client.AppsV1Api(api_client)
    except (config.ConfigException, OSError) as error:
        raise ConfigError(f"no Kubernetes credentials ({error}): run in a pod with the manifests' "
                          "ServiceAccount, or pass --kubeconfig (or set KUBECONFIG)") from None


def add_actuator_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "host", default="127.0.0.1", help="address of the grpc.health.v1 server (for probes)")
    add_flag(parser, "port", default=0, type=int,
             help="port of the grpc.health.v1 server (0 = any free port)")
    add_flag(parser, "etcd", default="",
             help="etcd endpoints host:port[,host:port...] the control plane uses")
    add_etcd_access_flags(parser)
    add_flag(parser, "namespace", default="default", help="deployment namespace in etcd")
    add_flag(parser, "k8s-namespace", default="default",
             help="Kubernetes namespace of the pools' Deployments")
    for role in POOLS:
        add_flag(parser, f"{role}-deployment", default="",
                 help=f"the {role} pool's Deployment (none: no {role} pool)")
        add_flag(parser, f"max-{role}", default=0, type=int,
                 help=f"most {role} replicas (the plan's workers)")
    add_flag(parser, "kubeconfig", default="", help="kubeconfig file (default: in a pod its ServiceAccount, "
             "else KUBECONFIG or ~/.kube/config)")
    add_flag(parser, "resync-s", default=ActuatorConfig.resync_s, type=float,
             help="seconds between checks that the Deployments are still at the target")
    add_flag(parser, "retry-s", default=ActuatorConfig.retry_s, type=float,
             help="seconds before trying again after etcd or the API server failed")


def actuator_config(args: argparse.Namespace) -> ActuatorConfig:
    pools = tuple(PoolDeployment(role, getattr(args, f"{role}_deployment"), getattr(args, f"max_{role}"))
                  for role in POOLS if getattr(args, f"{role}_deployment"))
    return ActuatorConfig(etcd=tuple(e for e in args.etcd.split(",") if e), namespace=args.namespace,
                          k8s_namespace=args.k8s_namespace, pools=pools, resync_s=args.resync_s,
                          retry_s=args.retry_s, etcd_access=etcd_access(args))


async def run_actuator(args: argparse.Namespace) -> int:
    """`dynamo-grpc k8s-actuator`: act on the scale target until SIGTERM, answering health checks."""
    config = actuator_config(args)
    actuator = ReplicaActuator(config, apps_api(args.kubeconfig))
    server = await start_server([], host=args.host, port=args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    pools = ", ".join(f"{p.deployment} (at most {p.most})" for p in config.pools)
    log.info("following the scale target of namespace %s in etcd; scaling %s in Kubernetes namespace %s; "
             "health on port %d", config.namespace, pools, config.k8s_namespace, server.port)
    try:
        await actuator.run(stop)
    finally:
        await server.stop()
    return 0
