"""Autoscaling on Kubernetes: `dynamo-grpc k8s-actuator` sets the pools' Deployment replicas from the
control plane's scale target.

Real etcd; the compiled manifests applied to a small API server (tests/k8s_api_server.py) that the real
kubernetes client calls over HTTP, as the manifests' ServiceAccount; the actuator and the control plane
run with the arguments their manifests give them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiException

from control_plane.compiler import compile_spec
from control_plane.k8s_actuator import ReplicaActuator, actuator_config, apps_api
from control_plane.kubernetes import write_manifests
from control_plane.role import start_control_plane
from control_plane.spec import parse_spec
from dynamo_grpc.cli import autoscaling_config, build_parser
from dynamo_grpc.config import server_config
from dynamo_grpc.registry import SCALE_DOCUMENT, EtcdRegistry
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb
from tests.etcd_server import EtcdServer
from tests.k8s_api_server import FakeApiServer
from tests.processes import RoleProcess
from tests.waiting import eventually

SPEC = """
name: scaled
model: {served_name: sim-tiny, engine: simulated}
hosts: [{name: here, address: 127.0.0.1}]
prefill: {workers: 2}
decode: {workers: 3}
slo: {ttft_ms: 2000, itl_ms: 100}
autoscaling: {prefill_requests_per_s: 2, decode_requests_per_s: 2}
etcd: [ETCD]
"""
K8S_NAMESPACE = "serving"
PREFILL, DECODE = "scaled-prefill", "scaled-decode"
FAST = ["--resync-s", "0.5", "--retry-s", "0.2"]


@dataclass
class Cluster:
    api: FakeApiServer
    manifests: dict[str, list[dict[str, Any]]]
    kubeconfig: Path

    def container_args(self, part: str) -> list[str]:
        deployment = next(d for d in self.manifests[part] if d["kind"] == "Deployment")
        return list(deployment["spec"]["template"]["spec"]["containers"][0]["args"])

    def actuator_args(self) -> list[str]:
        """The manifest's arguments, with the downward API's namespace and the pod's credentials made
        explicit, health on loopback, and short periods."""
        args = self.container_args("k8s-actuator")
        for flag in ("--host", "--port"):
            del args[args.index(flag):args.index(flag) + 2]
        return [*args, "--k8s-namespace", K8S_NAMESPACE, "--kubeconfig", str(self.kubeconfig), *FAST]

    def replicas(self) -> tuple[int, int]:
        return self.api.replicas[(K8S_NAMESPACE, PREFILL)], self.api.replicas[(K8S_NAMESPACE, DECODE)]

    async def reaches(self, replicas: tuple[int, int], timeout_s: float = 20.0) -> None:
        async def there() -> bool:
            return self.replicas() == replicas
        await eventually(there, timeout_s, f"replicas (prefill, decode) {replicas}, last {self.replicas()}")


@pytest.fixture
async def cluster(etcd: EtcdServer, tmp_path: Path) -> AsyncIterator[Cluster]:
    plan = compile_spec(parse_spec(SPEC.replace("ETCD", etcd.endpoint)))
    paths = write_manifests(plan, tmp_path / "k8s", namespace=K8S_NAMESPACE, etcd_endpoints=etcd.endpoint)
    manifests = {p.stem: list(yaml.safe_load_all(p.read_text())) for p in paths if p.suffix == ".yaml"}
    async with FakeApiServer() as api:
        for documents in manifests.values():
            api.apply(documents)
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig", K8S_NAMESPACE, "scaled-k8s-actuator")
        yield Cluster(api, manifests, kubeconfig)


async def publish(etcd: EtcdServer, prefill: int, decode: int, version: int) -> None:
    """A target as the control plane writes it."""
    target = cp_pb.ScaleTarget(prefill_workers=prefill, decode_workers=decode, version=version, reason="test")
    async with EtcdRegistry([etcd.endpoint], namespace="scaled") as registry:
        await registry.put_document(SCALE_DOCUMENT, target.SerializeToString())


@contextlib.asynccontextmanager
async def running_actuator(cluster: Cluster) -> AsyncIterator[None]:
    args = build_parser().parse_args(cluster.actuator_args())
    actuator = ReplicaActuator(actuator_config(args), apps_api(args.kubeconfig))
    stop = asyncio.Event()
    running = asyncio.create_task(actuator.run(stop))
    try:
        yield
    finally:
        stop.set()
        await running


async def test_the_control_planes_target_sets_the_replicas_never_past_the_plan(
        etcd: EtcdServer, cluster: Cluster) -> None:
    # (1) Applied, the autoscaled pools start at one pod each: their manifests leave replicas out.
    assert cluster.replicas() == (1, 1)
    # (2) The control plane, run with its manifest's arguments, publishes its first target: every planned
    # worker; the actuator sets the Deployments to it.
    args = build_parser().parse_args([*cluster.container_args("control-plane"), "--host", "127.0.0.1",
                                      "--port", "0"])
    server = server_config(args)
    registry = EtcdRegistry(list(server.etcd), namespace=server.namespace)
    await registry.connect()
    role = await start_control_plane(server, registry, autoscaling=autoscaling_config(args))
    try:
        async with running_actuator(cluster):
            await cluster.reaches((2, 3))
            await role.stop()
            # (3) Each new target is followed, down to zero.
            await publish(etcd, 0, 1, version=100)
            await cluster.reaches((0, 1))
            # (4) A target past the plan's workers gets the plan's workers, and no more ever.
            await publish(etcd, 9, 9, version=101)
            await cluster.reaches((2, 3))
            # (5) Replicas changed behind its back (`kubectl scale`) are set back at the next resync.
            cluster.api.replicas[(K8S_NAMESPACE, DECODE)] = 0
            await cluster.reaches((2, 3), timeout_s=5.0)
            # (6) With the target gone from etcd, the pools stay as they are.
            patches = len(cluster.api.patches)
            await registry.delete_document(SCALE_DOCUMENT)
            await asyncio.sleep(1.5)
            assert cluster.replicas() == (2, 3) and len(cluster.api.patches) == patches
    finally:
        await role.stop()
        await registry.close()
    assert max(r for name, r in cluster.api.patches if name == PREFILL) == 2
    assert max(r for name, r in cluster.api.patches if name == DECODE) == 3


async def test_etcd_outages_and_api_server_refusals_are_retried(etcd: EtcdServer, cluster: Cluster) -> None:
    # (1) etcd is down when the actuator starts: nothing changes until it is back.
    await publish(etcd, 2, 1, version=1)
    etcd.stop()
    async with running_actuator(cluster):
        await asyncio.sleep(1.0)
        assert cluster.replicas() == (1, 1) and not cluster.api.patches
        etcd.start()
        await cluster.reaches((2, 1))
        # (2) etcd restarts while it runs: it follows the target published after.
        etcd.stop()
        await asyncio.sleep(1.0)
        etcd.start()
        await publish(etcd, 1, 3, version=2)
        await cluster.reaches((1, 3))
        # (3) The API server refuses calls for a while (503): it tries again until the target holds.
        cluster.api.fail_next(4)
        await publish(etcd, 0, 0, version=3)
        await cluster.reaches((0, 0))
    assert cluster.api.refused == 4


async def test_the_role_allows_the_pools_scale_and_nothing_else(
        etcd: EtcdServer, cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="control_plane.k8s_actuator")
    # (1) As the actuator's ServiceAccount, the router's scale is out of reach.
    apps = apps_api(str(cluster.kubeconfig))
    with pytest.raises(ApiException) as refused:
        await asyncio.to_thread(apps.read_namespaced_deployment_scale, "scaled-router", K8S_NAMESPACE)
    assert refused.value.status == 403
    # (2) With a Role that leaves the prefill pool out, that pool is reported and the decode pool still
    # scales; once the Role allows it again, the prefill pool follows too.
    role = (K8S_NAMESPACE, "scaled-k8s-actuator")
    allowed = cluster.api.roles[role]
    cluster.api.roles[role] = [{**allowed[0], "resourceNames": [DECODE]}]
    await publish(etcd, 2, 2, version=1)
    async with running_actuator(cluster):
        await cluster.reaches((1, 2))
        assert ("forbidden (403): the actuator's Role must allow get and patch on deployments/scale "
                f"{PREFILL}") in caplog.text
        cluster.api.roles[role] = allowed
        await cluster.reaches((2, 2))


@pytest.mark.slow
async def test_a_restarted_actuator_resumes_from_the_current_target(
        etcd: EtcdServer, cluster: Cluster, tmp_path: Path) -> None:
    # (1) `dynamo-grpc k8s-actuator` as its pod runs it: it serves health and sets the target.
    await publish(etcd, 2, 3, version=1)
    first = RoleProcess("k8s-actuator", *cluster.actuator_args()[1:], log_dir=tmp_path)
    try:
        await first.wait_serving()
        await cluster.reaches((2, 3))
    finally:
        first.signal(signal.SIGKILL)  # killed without a goodbye, as a node loss would
        first.wait_exit()
    # (2) While none runs, a new target changes nothing.
    await publish(etcd, 1, 1, version=2)
    await asyncio.sleep(1.0)
    assert cluster.replicas() == (2, 3)
    patches = len(cluster.api.patches)
    # (3) The next one starts from the current target, straight to it, and stops cleanly on SIGTERM.
    second = RoleProcess("k8s-actuator", *cluster.actuator_args()[1:], log_dir=tmp_path)
    try:
        await cluster.reaches((1, 1))
        assert cluster.api.patches[patches:] == [(PREFILL, 1), (DECODE, 1)]
    finally:
        second.signal(signal.SIGTERM)
        assert second.wait_exit() == 0, second.log()
