"""Plan -> Kubernetes manifests: a Deployment per worker pool, the router and control plane with Services.

Kubernetes, not the plan, picks nodes and GPUs here: each worker pod asks for `tensor_parallel_size`
`nvidia.com/gpu` and the device plugin sets CUDA_VISIBLE_DEVICES. Pods register under their pod IP
(downward API, through the DYNAMO_GRPC_* variables the flags read). By default each pod counts as its
own host, so KV always moves over gRPC: pods have private /dev/shm and process ids. With
`shared_memory=True` worker pods register under their node's name and share the node's /dev/shm and
process ids (hostPID, so a worker's sweep of dead workers' segments sees every owner), and same-node
pairs take the shared-memory path. etcd is not deployed here (see the note written beside the
manifests). Output is plain YAML, identical for identical inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from control_plane.compiler import Plan, PlannedProcess

DEFAULT_IMAGE = "dynamo-grpc:latest"
GPU_RESOURCE = "nvidia.com/gpu"


def write_manifests(plan: Plan, out_dir: str | Path, *, image: str = DEFAULT_IMAGE,
                    images: Mapping[str, str] | None = None, namespace: str = "default",
                    etcd_endpoints: str | None = None, shared_memory: bool = False) -> list[Path]:
    """Write prefill.yaml, decode.yaml, router.yaml, control-plane.yaml and etcd-NOTE.md; return their paths.

    `images` overrides `image` per role ("prefill", "decode", "router", "control-plane"); `etcd_endpoints`
    (host:port[,...]) replaces the plan's etcd, which usually names hosts outside the cluster.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    etcd = etcd_endpoints or ",".join(plan.etcd)
    written = []
    for role in ("prefill", "decode", "router", "control-plane"):
        processes = plan.by_role(role)
        if not processes:
            continue
        image_for_role = (images or {}).get(role, image)
        documents = [_deployment(plan, role, processes, image_for_role, namespace, etcd, shared_memory)]
        if role in ("router", "control-plane"):
            documents.append(_service(plan, role, processes[0].port, namespace))
        path = out / f"{role}.yaml"
        path.write_text(yaml.dump_all(documents, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False))
        written.append(path)
    note = out / "etcd-NOTE.md"
    note.write_text(_etcd_note(plan, etcd))
    written.append(note)
    return written


class _PlainDumper(yaml.SafeDumper):
    """Writes repeated values out in full: anchors and aliases confuse people reading manifests."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _labels(plan: Plan, role: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "dynamo-grpc", "app.kubernetes.io/instance": plan.name,
            "app.kubernetes.io/component": role}


def _deployment(plan: Plan, role: str, processes: list[PlannedProcess], image: str, namespace: str,
                etcd: str, shared_memory: bool) -> dict[str, Any]:
    first = processes[0]
    port = first.port
    args = [role, "--host", "0.0.0.0", "--port", str(port), "--etcd", etcd, "--namespace", plan.namespace,
            *first.engine_flags]
    container: dict[str, Any] = {
        "name": role, "image": image, "command": ["dynamo-grpc"], "args": args,
        "ports": [{"name": "grpc", "containerPort": port}],
        "env": [
            {"name": "DYNAMO_GRPC_NODE_NAME",
             "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName" if shared_memory else "metadata.name"}}},
            {"name": "DYNAMO_GRPC_ADVERTISE_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
        "readinessProbe": {"grpc": {"port": port}, "periodSeconds": 5},
    }
    if first.devices:
        gpus = first.tensor_parallel_size
        container["resources"] = {"limits": {GPU_RESOURCE: gpus}, "requests": {GPU_RESOURCE: gpus}}
    pod: dict[str, Any] = {"containers": [container]}
    if shared_memory and role in ("prefill", "decode"):
        pod["hostPID"] = True
        container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
        pod["volumes"] = [{"name": "dshm", "hostPath": {"path": "/dev/shm", "type": "Directory"}}]
    labels = _labels(plan, role)
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"{plan.name}-{role}", "namespace": namespace, "labels": labels},
        "spec": {"replicas": len(processes), "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": pod}},
    }


def _service(plan: Plan, role: str, port: int, namespace: str) -> dict[str, Any]:
    labels = _labels(plan, role)
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": f"{plan.name}-{role}", "namespace": namespace, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": "grpc", "port": port, "targetPort": port}]},
    }


def _etcd_note(plan: Plan, etcd: str) -> str:
    return (
        f"# etcd for {plan.name}\n\n"
        f"These manifests do not deploy etcd. Every pod registers in etcd at `{etcd}` under namespace\n"
        f"`{plan.namespace}`; run etcd 3.4+ where pods can reach it (for example the Bitnami etcd chart, then\n"
        "`dynamo-grpc compile --k8s-etcd <release>-etcd:2379`), or point an existing cluster at it.\n\n"
        "The model must be readable at the path in the worker args (`--model-path`) inside the image or a\n"
        "volume you add.\n"
    )
