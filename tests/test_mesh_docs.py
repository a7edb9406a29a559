"""The mesh examples in docs/ that no test can run here still say what our code does: the Envoy config is a
valid Envoy bootstrap (every field and type checked against Envoy's own API protos) wired to our picker's
names, and the InferencePool example selects the pods and Service that the Kubernetes compiler writes."""

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
from dynamo_grpc.config import EndpointPickerConfig
from dynamo_grpc.routing.router import PickedPair
from dynamo_grpc.services.endpoint_picker import DESTINATION_HEADER, SERVICE_NAME

DOCS = Path(__file__).resolve().parent.parent / "docs"
# The typed configs the Envoy example names by type URL: importing their modules registers them.
ENVOY_EXTENSIONS = ("network.http_connection_manager.v3.http_connection_manager_pb2", "http.router.v3.router_pb2",
                    "http.ext_proc.v3.ext_proc_pb2")


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


def test_the_inference_pool_example_selects_what_the_compiler_writes(tmp_path: Path) -> None:
    plan = compile_spec(load_spec(DOCS.parent / "examples" / "disagg_8gpu.yaml"))
    written = {path.stem: list(yaml.safe_load_all(path.read_text())) for path in
               write_manifests(plan, tmp_path, namespace="serving") if path.suffix == ".yaml"}
    example = {doc["kind"]: doc for doc in yaml.safe_load_all((DOCS / "mesh" / "inference-pool.yaml").read_text())}

    def ours(labels: dict[str, str]) -> dict[str, str]:
        return {**labels, "app.kubernetes.io/instance": plan.name}  # the example's plan is called llama

    decode_pods = _deployment(written["decode"])["spec"]["template"]["metadata"]["labels"]
    pool = example["InferencePool"]["spec"]
    assert ours(pool["selector"]["matchLabels"]) == decode_pods
    assert pool["targetPorts"] == [{"number": EndpointPickerConfig(port=9002).target_port}]

    service = example["Service"]
    router = _deployment(written["router"])
    assert ours(service["spec"]["selector"]) == router["spec"]["template"]["metadata"]["labels"]
    assert pool["endpointPickerRef"]["name"] == service["metadata"]["name"]
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    compiled = next(doc for doc in written["router"] if doc["kind"] == "Service")
    assert {p["name"]: p["port"] for p in compiled["spec"]["ports"]}.items() <= ports.items()
    assert pool["endpointPickerRef"]["port"]["number"] == ports["ext-proc"]
    kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)


def _deployment(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return next(doc for doc in documents if doc["kind"] == "Deployment")
