"""Plan -> Kubernetes manifests: a Deployment per worker pool, the router and control plane with Services,
etcd, for an autoscaled plan the actuator that sets the pools' replicas, and on request the InferencePool
of an Envoy-based gateway whose endpoint picker is the router (docs/mesh.md).

Kubernetes, not the plan, picks nodes and GPUs here: each worker pod asks for `tensor_parallel_size`
`nvidia.com/gpu` and the device plugin sets CUDA_VISIBLE_DEVICES. Pods register under their pod IP
(downward API, through the DYNAMO_GRPC_* variables the flags read). By default each pod counts as its
own host, so KV always moves over gRPC: pods have private /dev/shm and process ids. With
`shared_memory=True` worker pods register under their node's name and share the node's /dev/shm and
process ids (hostPID, so a worker's sweep of dead workers' segments sees every owner), and same-node
pairs take the shared-memory path. Every process is probed through grpc.health.v1 (Kubernetes' `grpc`
probes, GA since 1.27, the oldest release these manifests target). Output is plain YAML, identical for
identical inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from control_plane.compiler import Plan, PlannedProcess
from dynamo_grpc.engine.registry import ENGINES

DEFAULT_IMAGE = "dynamo-grpc:latest"
ETCD_IMAGE = "quay.io/coreos/etcd:v3.5.17"
GPU_RESOURCE = "nvidia.com/gpu"
KUBERNETES_VERSION = "1.27"
"""The oldest Kubernetes the manifests are written for (and validated against)."""
ETCD_PORT = 2379
ACTUATOR_PORT = 50070
ACTUATOR = "k8s-actuator"
WORKER_START_S = 900
"""How long a worker may take to serve: it reports NOT_SERVING while a large model's weights load."""
SERVER_START_S = 120
FRONTEND_PORT = 8000
"""The OpenAI frontend beside each decode worker, where a gateway sends what the endpoint picker picks."""
EXT_PROC_PORT = 9002
"""The router's endpoint picker (Envoy's External Processing API), at the port gateways expect it."""
INFERENCE_POOL = "inference-pool"

PARTS = {"etcd", "prefill", "decode", "router", "control-plane", ACTUATOR, INFERENCE_POOL}

_PER_POD_FLAGS = {"--advertise-host", "--node-name", "--worker-id", "--workers"}
"""Flags of the plan's commands that each pod sets for itself: its address and node through the
environment, a worker id of its own by default (replicas share one pod template), one process (a
router scales by replicas)."""


def write_manifests(plan: Plan, out_dir: str | Path, *, image: str = DEFAULT_IMAGE,
                    images: Mapping[str, str] | None = None, namespace: str = "default",
                    etcd_endpoints: str | None = None, shared_memory: bool = False,
                    endpoint_picker: bool = False) -> list[Path]:
    """Write one YAML file per part (etcd, prefill, decode, router, control-plane, k8s-actuator) and a
    README.md; return their paths. With `endpoint_picker`, the router is also the endpoint picker of an
    Envoy-based gateway (docs/mesh.md): each decode pod gets the OpenAI frontend beside its worker, and
    `inference-pool.yaml` an InferencePool of the decode pods for the gateway's HTTPRoute.

    `images` overrides `image` per part ("prefill", "decode", "router", "control-plane", "k8s-actuator",
    "etcd"). Without `etcd_endpoints` (host:port[,...]) the manifests run a one-member etcd in the
    cluster; with it they use that etcd instead (the plan's own etcd usually names hosts outside it).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = images or {}
    etcd = etcd_endpoints or f"{_name(plan, 'etcd')}:{ETCD_PORT}"
    files: dict[str, list[dict[str, Any]]] = {}
    if etcd_endpoints is None:
        files["etcd"] = _etcd(plan, images.get("etcd", ETCD_IMAGE), namespace)
    for role in ("prefill", "decode", "router", "control-plane"):
        processes = plan.by_role(role)
        if not processes:
            continue
        documents = [_deployment(plan, processes, images.get(role, image), namespace, etcd, shared_memory)]
        if role in ("router", "control-plane"):
            documents.append(_service(plan, role, processes[0], namespace))
        files[role] = documents
    if plan.autoscaling:
        files[ACTUATOR] = _actuator(plan, images.get(ACTUATOR, image), namespace, etcd)
    if endpoint_picker and {"decode", "router"} <= files.keys():
        _add_endpoint_picker(plan, files, etcd)
        files[INFERENCE_POOL] = [_inference_pool(plan, namespace)]
    for stale in PARTS.difference(files):  # from an earlier compile: `kubectl apply -f` would apply it too
        (out / f"{stale}.yaml").unlink(missing_ok=True)
    written = []
    for part, documents in files.items():
        path = out / f"{part}.yaml"
        path.write_text(yaml.dump_all(documents, Dumper=_PlainDumper, sort_keys=False,
                                      default_flow_style=False))
        written.append(path)
    readme = out / "README.md"
    readme.write_text(_readme(plan, etcd, in_cluster_etcd=etcd_endpoints is None,
                              inference_pool=INFERENCE_POOL in files))
    written.append(readme)
    return written


class _PlainDumper(yaml.SafeDumper):
    """Writes repeated values out in full: anchors and aliases confuse people reading manifests."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _name(plan: Plan, part: str) -> str:
    return f"{plan.name}-{part}"


def _labels(plan: Plan, part: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "dynamo-grpc", "app.kubernetes.io/instance": plan.name,
            "app.kubernetes.io/component": part}


def _metadata(plan: Plan, part: str, namespace: str) -> dict[str, Any]:
    return {"name": _name(plan, part), "namespace": namespace, "labels": _labels(plan, part)}


def _pod_args(process: PlannedProcess, etcd: str) -> list[str]:
    """The plan's command line for a pod: every flag of the role, listening on all interfaces, the
    cluster's etcd, and nothing that names one host or one worker."""
    command = list(process.command[1:])
    args: list[str] = []
    while command:
        token = command.pop(0)
        if token in _PER_POD_FLAGS:
            command.pop(0)
        elif token in ("--host", "--etcd"):
            command.pop(0)
            args += [token, "0.0.0.0" if token == "--host" else etcd]
        else:
            args.append(token)
    return args


def _grpc_probes(port: int, start_s: int) -> dict[str, Any]:
    """grpc.health.v1 probes: SERVING once started, NOT_SERVING while draining (out of Services), and a
    process that stops answering is restarted."""
    check = {"grpc": {"port": port}}
    return {
        "startupProbe": {**check, "periodSeconds": 5, "failureThreshold": start_s // 5},
        "readinessProbe": {**check, "periodSeconds": 5},
        "livenessProbe": {**check, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
    }


def _pod_identity(shared_memory: bool) -> list[dict[str, Any]]:
    node = "spec.nodeName" if shared_memory else "metadata.name"
    return [{"name": "DYNAMO_GRPC_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": node}}},
            {"name": "DYNAMO_GRPC_ADVERTISE_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]


def _deployment(plan: Plan, processes: list[PlannedProcess], image: str, namespace: str, etcd: str,
                shared_memory: bool) -> dict[str, Any]:
    first = processes[0]
    role = first.role
    worker = role in ("prefill", "decode")
    container: dict[str, Any] = {
        "name": role, "image": image, "command": ["dynamo-grpc"], "args": _pod_args(first, etcd),
        "ports": [{"name": "grpc", "containerPort": first.port},
                  {"name": "metrics", "containerPort": first.metrics_port}],
        "env": _pod_identity(shared_memory and worker),
        **_grpc_probes(first.port, WORKER_START_S if worker else SERVER_START_S),
    }
    if first.devices:
        gpus = first.tensor_parallel_size
        container["resources"] = {"limits": {GPU_RESOURCE: gpus}, "requests": {GPU_RESOURCE: gpus}}
    pod: dict[str, Any] = {"containers": [container]}
    if shared_memory and worker:
        pod["hostPID"] = True
        container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
        pod["volumes"] = [{"name": "dshm", "hostPath": {"path": "/dev/shm", "type": "Directory"}}]
    labels = _labels(plan, role)
    spec: dict[str, Any] = {"replicas": len(processes), "selector": {"matchLabels": labels}}
    if worker:
        if plan.autoscaling:
            del spec["replicas"]  # the actuator owns it: `kubectl apply` again must not reset the pool
        # Replace a pod before starting its successor: a surge pod would wait for a GPU nobody frees.
        spec["strategy"] = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    else:
        spec["strategy"] = {"type": "Recreate"}  # one control plane (one autoscaler) at a time
    # Prometheus' pod discovery (kubernetes_sd_configs) keeps pods that ask to be scraped, at their port.
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": str(first.metrics_port),
              "prometheus.io/path": "/metrics"}
    spec["template"] = {"metadata": {"labels": labels, "annotations": scrape}, "spec": pod}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _metadata(plan, role, namespace),
            "spec": spec}


def _service(plan: Plan, role: str, process: PlannedProcess, namespace: str) -> dict[str, Any]:
    ports = [{"name": "grpc", "port": process.port, "targetPort": process.port},
             {"name": "metrics", "port": process.metrics_port, "targetPort": process.metrics_port}]
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": _metadata(plan, role, namespace),
        "spec": {"selector": _labels(plan, role), "ports": ports},
    }


def _add_endpoint_picker(plan: Plan, files: dict[str, list[dict[str, Any]]], etcd: str) -> None:
    """The router serves the picker on EXT_PROC_PORT (and its Service with it); each decode pod runs
    `dynamo-grpc frontend` beside its worker, with the router's routing flags and the model's chat
    template."""
    router_deployment, router_service = files["router"]
    router = router_deployment["spec"]["template"]["spec"]["containers"][0]
    router["args"] += ["--ext-proc-port", str(EXT_PROC_PORT), "--ext-proc-target-port", str(FRONTEND_PORT)]
    router["ports"].append({"name": "ext-proc", "containerPort": EXT_PROC_PORT})
    router_service["spec"]["ports"].append({"name": "ext-proc", "port": EXT_PROC_PORT,
                                            "targetPort": EXT_PROC_PORT})
    args = _pod_args(plan.by_role("router")[0], etcd)
    args[0] = "frontend"
    args[args.index("--port") + 1] = str(FRONTEND_PORT)
    model_path = _model_path(plan)
    if model_path:
        args += ["--model-path", model_path]
    decode = files["decode"][0]["spec"]["template"]["spec"]
    decode["containers"].append({
        "name": "frontend", "image": decode["containers"][0]["image"], "command": ["dynamo-grpc"],
        "args": args,
        "ports": [{"name": "http", "containerPort": FRONTEND_PORT}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": FRONTEND_PORT}, "periodSeconds": 5},
    })


def _inference_pool(plan: Plan, namespace: str) -> dict[str, Any]:
    """Gateway API Inference Extension: the decode pods' frontends, picked by the router."""
    return {
        "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": _metadata(plan, "decode", namespace),
        "spec": {"selector": {"matchLabels": _labels(plan, "decode")},
                 "targetPorts": [{"number": FRONTEND_PORT}],
                 "endpointPickerRef": {"name": _name(plan, "router"), "port": {"number": EXT_PROC_PORT},
                                       "failureMode": "FailClose"}},
    }


def _model_path(plan: Plan) -> str:
    field = ENGINES[plan.engine].model_path_field
    return next((p.engine_args[field] for p in plan.workers), "") if field else ""


def _etcd(plan: Plan, image: str, namespace: str) -> list[dict[str, Any]]:
    """One etcd member: a StatefulSet, so two never run at once, behind a headless Service.

    It keeps its data in the pod (emptyDir) and needs no storage class: after a loss workers re-register
    under a new lease, the pairing table follows them, and the pools keep their size until the
    autoscaler's next target.
    """
    name, labels = _name(plan, "etcd"), _labels(plan, "etcd")
    peer = "http://127.0.0.1:2380"
    args = ["--name", name, "--data-dir", "/var/lib/etcd",
            "--listen-client-urls", f"http://0.0.0.0:{ETCD_PORT}",
            "--advertise-client-urls", f"http://{name}:{ETCD_PORT}",
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{name}={peer}",
            "--auto-compaction-retention", "1"]
    health = {"httpGet": {"path": "/health", "port": ETCD_PORT}}
    container = {
        "name": "etcd", "image": image, "command": ["/usr/local/bin/etcd"], "args": args,
        "ports": [{"name": "client", "containerPort": ETCD_PORT}],
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/etcd"}],
        "readinessProbe": {**health, "periodSeconds": 5},
        "livenessProbe": {**health, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
    }
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(plan, "etcd", namespace),
         "spec": {"clusterIP": "None", "selector": labels,
                  "ports": [{"name": "client", "port": ETCD_PORT, "targetPort": ETCD_PORT}]}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _metadata(plan, "etcd", namespace),
         "spec": {"serviceName": name, "replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels},
                               "spec": {"containers": [container],
                                        "volumes": [{"name": "data", "emptyDir": {}}]}}}},
    ]


def _actuator(plan: Plan, image: str, namespace: str, etcd: str) -> list[dict[str, Any]]:
    """The actuator's Deployment and the one permission it needs: read and patch the scale of the pools'
    Deployments (`dynamo-grpc k8s-actuator`, control_plane/k8s_actuator.py)."""
    metadata = _metadata(plan, ACTUATOR, namespace)
    name, labels = metadata["name"], metadata["labels"]
    pools = {role: len(plan.by_role(role)) for role in ("prefill", "decode") if plan.by_role(role)}
    args = [ACTUATOR, "--host", "0.0.0.0", "--port", str(ACTUATOR_PORT), "--etcd", etcd,
            "--namespace", plan.namespace]
    for role, most in pools.items():
        args += [f"--{role}-deployment", _name(plan, role), f"--max-{role}", str(most)]
    container = {
        "name": ACTUATOR, "image": image, "command": ["dynamo-grpc"], "args": args,
        "ports": [{"name": "grpc", "containerPort": ACTUATOR_PORT}],
        "env": [{"name": "DYNAMO_GRPC_K8S_NAMESPACE",
                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
        **_grpc_probes(ACTUATOR_PORT, SERVER_START_S),
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": metadata,
         "rules": [{"apiGroups": ["apps"], "resources": ["deployments/scale"],
                    "resourceNames": [_name(plan, role) for role in pools], "verbs": ["get", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": metadata,
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata,
         "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "strategy": {"type": "Recreate"},
                  "template": {"metadata": {"labels": labels},
                               "spec": {"serviceAccountName": name, "containers": [container]}}}},
    ]


def _readme(plan: Plan, etcd: str, *, in_cluster_etcd: bool, inference_pool: bool) -> str:
    lines = [f"# Kubernetes manifests for {plan.name}", "",
             f"Apply them all with `kubectl apply -f .` (Kubernetes {KUBERNETES_VERSION} or newer).",
             f"Every process registers in etcd at `{etcd}`, under namespace `{plan.namespace}`."]
    if in_cluster_etcd:
        lines += ["`etcd.yaml` runs that etcd in the cluster, one member. To use an etcd of your own",
                  "(e.g. three members), compile again with `--k8s-etcd host:port[,...]`: then no etcd.yaml",
                  "is written."]
    else:
        lines += ["That etcd is not deployed here: the pods must be able to reach it."]
    if plan.autoscaling:
        lines += ["", "The worker pools are autoscaled: `k8s-actuator.yaml` runs `dynamo-grpc k8s-actuator`,",
                  "which sets the prefill and decode Deployments' replicas from the control plane's scale",
                  "target (their manifests leave `replicas` to it). Its image needs the kubernetes client:",
                  "`dynamo-grpc[k8s]`."]
    if inference_pool:
        lines += ["", f"`inference-pool.yaml` is the InferencePool `{_name(plan, 'decode')}` (the Gateway",
                  "API Inference Extension's CRDs must be installed): route to it from your Gateway with an",
                  "HTTPRoute whose backendRef is that InferencePool. The router picks each request's pair,",
                  f"and the frontend in the chosen decode pod (port {FRONTEND_PORT}) runs it there. The",
                  "router's image needs Envoy's API stubs: `dynamo-grpc[mesh]`."]
    model_path = _model_path(plan)
    if model_path:
        lines += ["", f"The workers read the model at `{model_path}`: put it in the image or in a volume",
                  "you add."]
    return "\n".join(lines) + "\n"
