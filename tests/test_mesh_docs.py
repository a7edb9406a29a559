"""The mesh examples in docs/ that no test can run here still say what our code does: the Envoy config is a
valid Envoy bootstrap (every field and type checked against Envoy's own API protos) wired to our picker's
names; the Kubernetes compiler's endpoint-picker manifests are valid and the same as the docs' example."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from google.protobuf import json_format

from control_plane.compiler import compile_spec
from control_plane.kubernetes import KUBERNETES_VERSION, write_manifests
from control_plane.spec import load_spec
from dynamo_grpc.cli import build_parser
from dynamo_grpc.config import EndpointPickerConfig
from dynamo_grpc.routing.router import PickedPair
from dynamo_grpc.services.endpoint_picker import DESTINATION_HEADER, SERVICE_NAME

DOCS = Path(__file__).resolve().parent.parent / "docs"
# The typed configs the Envoy example names by type URL: importing their modules registers them.
ENVOY_EXTENSIONS = ("network.http_connection_manager.v3.http_connection_manager_pb2",
                    "http.router.v3.router_pb2", "http.ext_proc.v3.ext_proc_pb2")


def envoy_bootstrap() -> bootstrap_pb2.Bootstrap:
    for module in ENVOY_EXTENSIONS:
        importlib.import_module(f"envoy.extensions.filters.{module}")
    importlib.import_module("envoy.extensions.transport_sockets.tls.v3.tls_pb2")
    importlib.import_module("envoy.extensions.upstreams.http.v3.http_protocol_options_pb2")
    document = yaml.safe_load((DOCS / "mesh" / "envoy.yaml").read_text())
    return json_format.ParseDict(document, bootstrap_pb2.Bootstrap())  # unknown fields and bad values fail


def test_the_envoy_example_is_a_valid_bootstrap_wired_to_the_picker() -> None:
    bootstrap = envoy_bootstrap()
    clusters = {c.name: c for c in bootstrap.static_resources.clusters}
    assert clusters["dynamo_grpc_frontends"].original_dst_lb_config.http_header_name == DESTINATION_HEADER
    picker_health = clusters["dynamo_grpc_endpoint_picker"].health_checks[0].grpc_health_check.service_name
    assert picker_health == SERVICE_NAME
    router_health = clusters["dynamo_grpc_routers"].health_checks[0].grpc_health_check.service_name
    assert router_health == "dynamo_grpc.v1.RouterService"
    assert "ext_proc" in (DOCS / "mesh" / "envoy.yaml").read_text()
    assert PickedPair.DECODE_HEADER in (DOCS / "mesh.md").read_text()


def test_the_compiler_writes_the_endpoint_picker_and_the_inference_pool_the_docs_show(tmp_path: Path) -> None:
    plan = compile_spec(load_spec(DOCS.parent / "examples" / "disagg_8gpu.yaml"))
    paths = write_manifests(plan, tmp_path, namespace="serving", endpoint_picker=True)
    written = {path.stem: list(yaml.safe_load_all(path.read_text()))
               for path in paths if path.suffix == ".yaml"}
    # (1) Every Kubernetes object is valid (the InferencePool is a custom resource: checked below).
    for part, documents in written.items():
        for document in documents if part != "inference-pool" else ():
            for version in (KUBERNETES_VERSION, kubernetes_validate.latest_version()):
                kubernetes_validate.validate(document, version, strict=True)

    # (2) The router serves the picker, its Service exposes it, the decode pods run the frontend beside the
    # worker, and both command lines are ones `dynamo-grpc` accepts.
    router = _deployment(written["router"])["spec"]["template"]["spec"]["containers"][0]
    router_args = build_parser().parse_args(router["args"])
    picker = EndpointPickerConfig(router_args.ext_proc_port, router_args.ext_proc_target_port)
    service = next(doc for doc in written["router"] if doc["kind"] == "Service")
    assert {"name": "ext-proc", "port": picker.port, "targetPort": picker.port} in service["spec"]["ports"]
    decode_pod = _deployment(written["decode"])["spec"]["template"]
    frontend = next(c for c in decode_pod["spec"]["containers"] if c["name"] == "frontend")
    frontend_args = build_parser().parse_args(frontend["args"])
    assert frontend_args.command == "frontend" and not frontend_args.router  # it routes in its own process
    assert frontend_args.port == picker.target_port
    assert (frontend_args.etcd, frontend_args.policy) == (router_args.etcd, router_args.policy)

    # (3) The InferencePool picks those frontends through the router; the docs' example is the same for a
    # plan named llama.
    [pool] = written["inference-pool"]
    picker_ref = {"name": service["metadata"]["name"], "port": {"number": picker.port},
                  "failureMode": "FailClose"}
    assert pool["spec"] == {"selector": {"matchLabels": decode_pod["metadata"]["labels"]},
                            "targetPorts": [{"number": picker.target_port}], "endpointPickerRef": picker_ref}
    documented = yaml.safe_load_all((DOCS / "mesh" / "inference-pool.yaml").read_text())
    example = {doc["kind"]: doc for doc in documented}
    assert yaml.safe_dump(example["InferencePool"]) == yaml.safe_dump(pool).replace(plan.name, "llama")
    route = example["HTTPRoute"]["spec"]["rules"][0]["backendRefs"][0]
    assert (route["kind"], route["name"]) == ("InferencePool", example["InferencePool"]["metadata"]["name"])
    assert f"InferencePool `{pool['metadata']['name']}`" in (tmp_path / "README.md").read_text()

    # (4) Compiled again without the picker, the folder keeps no InferencePool for `kubectl apply -f`.
    write_manifests(plan, tmp_path, namespace="serving")
    assert not (tmp_path / "inference-pool.yaml").exists()


def _deployment(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return next(doc for doc in documents if doc["kind"] == "Deployment")
