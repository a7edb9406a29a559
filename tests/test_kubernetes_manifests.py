"""`compile --k8s-out`: the manifests are valid objects of the Kubernetes API, checked against its OpenAPI
schemas (shipped offline by kubernetes-validate, strict: unknown fields are errors), and they fit
together: every flag of the plan reaches its pod, gRPC health probes on the served port, one etcd that
every pod names, Services that select their pods, and for an autoscaled plan an actuator whose Role
allows exactly the scale of the pools it sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from control_plane.compiler import Plan, compile_spec
from control_plane.k8s_actuator import PoolDeployment, actuator_config
from control_plane.kubernetes import ETCD_PORT, KUBERNETES_VERSION, write_manifests
from control_plane.spec import load_spec
from dynamo_grpc.cli import build_parser, main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
VERSIONS = (KUBERNETES_VERSION, kubernetes_validate.latest_version())
POD_OWN = {"host", "etcd", "advertise_host", "node_name", "worker_id", "workers"}
"""Flags each pod sets for itself, or that differ in a cluster (a pod runs one router process)."""

Manifests = dict[str, list[dict[str, Any]]]


def read_manifests(paths: list[Path]) -> Manifests:
    return {p.stem: list(yaml.safe_load_all(p.read_text())) for p in paths if p.suffix == ".yaml"}


def kinds(manifests: Manifests, kind: str) -> list[dict[str, Any]]:
    return [d for documents in manifests.values() for d in documents if d["kind"] == kind]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    [only] = pod_spec(workload)["containers"]
    return only


def check_manifests(plan: Plan, manifests: Manifests, *, etcd: str, shared_memory: bool) -> None:
    documents = [d for docs in manifests.values() for d in docs]
    # (1) Every object is valid for the oldest Kubernetes targeted and the newest the schemas know.
    for document in documents:
        for version in VERSIONS:
            kubernetes_validate.validate(document, version, strict=True)
    deployments = {d["metadata"]["name"]: d for d in kinds(manifests, "Deployment")}
    # (2) Each role's pod runs the plan's command line for it, but for what a pod sets for itself.
    for role in ("prefill", "decode", "router", "control-plane"):
        if not plan.by_role(role):
            assert role not in manifests
            continue
        args = vars(build_parser().parse_args(container(deployments[f"{plan.name}-{role}"])["args"]))
        planned = vars(build_parser().parse_args(list(plan.by_role(role)[0].command[1:])))
        assert {k: v for k, v in args.items() if k not in POD_OWN} == \
            {k: v for k, v in planned.items() if k not in POD_OWN}
        assert (args["host"], args["etcd"], args.get("worker_id", "")) == ("0.0.0.0", etcd, "")
        # Prometheus finds each pod by its annotations, at the port its process serves /metrics on.
        deployment = deployments[f"{plan.name}-{role}"]
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(args["metrics_port"]) != "0"
        assert {"name": "metrics", "containerPort": args["metrics_port"]} in container(deployment)["ports"]
        assert args.get("workers", 1) == 1
    # (3) Our processes are probed through grpc.health.v1 on the port they serve.
    for deployment in deployments.values():
        ours = container(deployment)
        port = ours["ports"][0]["containerPort"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert ours[probe]["grpc"] == {"port": port}, (deployment["metadata"]["name"], probe)
    # (4) Services select their pods and reach the port those serve.
    workloads = [*deployments.values(), *kinds(manifests, "StatefulSet")]
    for service in kinds(manifests, "Service"):
        [target] = [w for w in workloads if service["spec"]["selector"].items()
                    <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert [p["targetPort"] for p in service["spec"]["ports"]] == \
            [p["containerPort"] for p in container(target)["ports"]]
    # (5) etcd: one member in the cluster behind the Service every pod names, or none (an external one).
    statefulsets = kinds(manifests, "StatefulSet")
    if etcd == f"{plan.name}-etcd:{ETCD_PORT}":
        [etcd_set] = statefulsets
        assert etcd_set["spec"]["replicas"] == 1 and etcd_set["spec"]["serviceName"] == f"{plan.name}-etcd"
        assert f"http://{etcd}" in container(etcd_set)["args"]
    else:
        assert not statefulsets
    # (6) Shared memory: worker pods share their node's /dev/shm and process ids, and only then.
    for role in ("prefill", "decode"):
        for deployment in (d for name, d in deployments.items() if name == f"{plan.name}-{role}"):
            assert pod_spec(deployment).get("hostPID", False) is shared_memory
            mounts = container(deployment).get("volumeMounts", [])
            assert ([m["mountPath"] for m in mounts] == ["/dev/shm"]) is shared_memory
    # (7) Autoscaled pools: replicas are the actuator's, and its Role allows their scale and nothing else.
    pools = {role: f"{plan.name}-{role}" for role in ("prefill", "decode") if plan.by_role(role)}
    assert all(("replicas" in deployments[name]["spec"]) is not plan.autoscaling for name in pools.values())
    assert ("k8s-actuator" in manifests) is plan.autoscaling
    if plan.autoscaling:
        check_actuator(plan, manifests, pools, etcd)


def check_actuator(plan: Plan, manifests: Manifests, pools: dict[str, str], etcd: str) -> None:
    account, role, binding, deployment = manifests["k8s-actuator"]
    assert [role["kind"], binding["kind"]] == ["Role", "RoleBinding"]
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["deployments/scale"],
                              "resourceNames": list(pools.values()), "verbs": ["get", "patch"]}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]
    assert pod_spec(deployment)["serviceAccountName"] == account["metadata"]["name"]
    config = actuator_config(build_parser().parse_args(container(deployment)["args"]))
    assert config.pools == tuple(PoolDeployment(r, name, len(plan.by_role(r))) for r, name in pools.items())
    assert (config.etcd, config.namespace) == ((etcd,), plan.namespace)


@pytest.mark.parametrize("shared_memory", [False, True], ids=["grpc-kv", "shared-memory"])
@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_example_compiles_to_valid_manifests(example: Path, shared_memory: bool,
                                                   tmp_path: Path) -> None:
    plan = compile_spec(load_spec(example))
    paths = write_manifests(plan, tmp_path, namespace="serving", shared_memory=shared_memory)
    assert (tmp_path / "README.md") in paths and (tmp_path / "etcd.yaml") in paths
    check_manifests(plan, read_manifests(paths), etcd=f"{plan.name}-etcd:{ETCD_PORT}",
                    shared_memory=shared_memory)


def test_an_etcd_of_ones_own_replaces_the_one_in_the_cluster(tmp_path: Path) -> None:
    plan = compile_spec(load_spec(EXAMPLES / "autoscaled_sim.yaml"))
    write_manifests(plan, tmp_path)
    paths = write_manifests(plan, tmp_path, etcd_endpoints="etcd.infra:2379")
    assert not (tmp_path / "etcd.yaml").exists()  # the earlier one is gone: `kubectl apply -f` would apply it
    check_manifests(plan, read_manifests(paths), etcd="etcd.infra:2379", shared_memory=False)
    assert "etcd.infra:2379" in (tmp_path / "README.md").read_text()


@pytest.mark.slow
def test_a_planned_spec_compiles_to_valid_manifests(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    assert main(["plan", "--isl", "3000", "--osl", "150", "--rate", "2", "--ttft-ms", "2000",
                 "--itl-ms", "60", "--max-gpus", "8", "--spec-out", str(spec), "--autoscale"]) == 0
    plan = compile_spec(load_spec(spec))
    assert plan.autoscaling and plan.by_role("prefill") and plan.by_role("decode")
    for shared_memory in (False, True):
        out = tmp_path / f"k8s-{shared_memory}"
        shared = ["--k8s-shared-memory"] if shared_memory else []
        assert main(["compile", str(spec), "--k8s-out", str(out), *shared]) == 0
        check_manifests(plan, read_manifests(sorted(out.iterdir())), etcd=f"{plan.name}-etcd:{ETCD_PORT}",
                        shared_memory=shared_memory)
