"""Deployment spec -> plan -> commands and manifests; `vllm serve` -> spec. Pure Python, no servers."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import grpc
import pytest
import yaml

from control_plane.compiler import compile_spec, plan_to_json, render_plan
from control_plane.from_vllm import spec_from_vllm
from control_plane.kubernetes import write_manifests
from control_plane.spec import SpecError, dump_spec, load_spec, parse_spec
from dynamo_grpc.cli import build_parser
from dynamo_grpc.config import ConfigError, server_config, worker_config
from dynamo_grpc.engine.vllm_engine import VllmEngineConfig
from dynamo_grpc.v1 import common_pb2 as pb
from tests.certificates import CertificateAuthority

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

GOOD = """\
name: llama-disagg
model:
  path: /models/llama-3-8b
  served_name: llama-3-8b
  engine: vllm
  engine_args: {dtype: bfloat16, max_model_len: 8192}
hosts:
  - {name: node-a, address: 10.0.0.1, gpus: 8}
  - {name: node-b, address: 10.0.0.2, gpus: 8}
prefill:
  workers: 4
  tensor_parallel_size: 2
  hosts: [node-a, node-b]
  engine_args: {max_num_batched_tokens: 8192}
decode:
  workers: 2
  tensor_parallel_size: 2
  hosts: [node-a, node-b]
router: {port: 50051, policy: kv_aware, disaggregation: {min_uncached_tokens: 512}}
slo: {ttft_ms: 500, itl_ms: 50}
transfer: {kv_ttl_s: 30, on_pull_failure: local-prefill}
etcd: [10.0.0.1:2379]
"""


def problems_of(text: str) -> str:
    with pytest.raises(SpecError) as caught:
        parse_spec(text, source="spec.yaml")
    return str(caught.value)


def replace(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


@pytest.mark.parametrize(("text", "expected"), [
    (replace("prefill:\n", "prefil:\n"), "spec.yaml:10: prefil: unknown field; did you mean 'prefill'?"),
    (replace("prefill:\n", "prefil:\n"), "spec.yaml:1: prefill: missing required field"),
    (replace("  workers: 4\n", "  workers: four\n"), "spec.yaml:11: prefill.workers: expected an integer, got 'four'"),
    (replace("  workers: 2\n", "  workers: 0\n"), "spec.yaml:16: decode.workers: must be at least 1, got 0"),
    (replace("tensor_parallel_size: 2\n  hosts: [node-a, node-b]\n  engine_args",
             "tensor_parallel_size: 3\n  hosts: [node-a, node-b]\n  engine_args"),
     "spec.yaml:12: prefill.tensor_parallel_size: must be a power of two (1, 2, 4, 8, ...), got 3; try 2 or 4"),
    (replace("  hosts: [node-a, node-b]\nrouter", "  hosts: [node-a, nodeb]\nrouter"),
     "spec.yaml:18: decode.hosts[1]: unknown host 'nodeb'; did you mean 'node-b'? (hosts: node-a, node-b)"),
    (replace("workers: 4\n", "workers: 12\n"),
     ("spec.yaml:8: hosts[0].gpus: host 'node-a' has 8 GPUs but its workers need 14 (prefill 6 x TP 2 + "
      "decode 1 x TP 2); lower workers or tensor_parallel_size")),
    (replace("port: 50051", "port: 70000"), "spec.yaml:19: router.port: port must be in 1..65535, got 70000"),
    (GOOD + "control_plane: {port: 50051}\n",
     "spec.yaml:23: control_plane.port: port 50051 on host 'node-a' is already router.port; pick another"),
    (replace("engine: vllm", "engine: vlm"),
     "spec.yaml:5: model.engine: unknown engine 'vlm'; did you mean 'vllm'? (choose from simulated, vllm)"),
    (replace("policy: kv_aware", "policy: kv-aware"),
     "spec.yaml:19: router.policy: unknown policy 'kv-aware'; did you mean 'kv_aware'?"),
    (replace("ttft_ms: 500", "ttft_ms: 0"), "spec.yaml:20: slo.ttft_ms: must be positive, got 0"),
    (replace("itl_ms: 50", "itl_ms: -5"), "spec.yaml:20: slo.itl_ms: must be positive, got -5"),
    (replace("on_pull_failure: local-prefill", "on_pull_failure: retry"),
     "spec.yaml:21: transfer.on_pull_failure: must be one of fail, local-prefill, got 'retry'"),
    (replace("max_model_len: 8192", "max_modle_len: 8192"),
     "spec.yaml:6: model.engine_args.max_modle_len: unknown engine argument for vllm; did you mean 'max_model_len'?"),
    (replace("max_num_batched_tokens: 8192", "max_num_batched_tokens: lots"),
     "spec.yaml:14: prefill.engine_args.max_num_batched_tokens: expected int (like the default 0), got 'lots'"),
    (replace("  path: /models/llama-3-8b\n", ""), "spec.yaml:3: model.path: missing required field"),
    (replace("etcd: [10.0.0.1:2379]\n", ""), "spec.yaml:1: etcd: missing required field"),
    (replace("etcd: [10.0.0.1:2379]", "etcd: [10.0.0.1]"), "spec.yaml:22: etcd[0]: expected host:port, got '10.0.0.1'"),
    (replace("  - {name: node-b,", "  - {name: node-a,"),
     "spec.yaml:9: hosts[1].name: host 'node-a' is already defined at line 8"),
    (replace("  hosts: [node-a, node-b]\nrouter", "  hosts: [node-a, node-b]\n  engine_args: {dtype: float16}\nrouter"),
     "spec.yaml:19: decode.engine_args.dtype: 'float16' differs from prefill's 'bfloat16'"),
    (replace("name: llama-disagg", "name: Llama_Disagg"), "spec.yaml:1: name: 'Llama_Disagg' must be 1-40 lowercase"),
    ("name: x\nmodel: [\n", "spec.yaml:3: (spec): not valid YAML"),
    (GOOD + "autoscaling: {decode_requests_per_s: 2.5}\n",
     "spec.yaml:23: autoscaling.prefill_requests_per_s: required with prefill workers"),
    (replace("slo: {ttft_ms: 500, itl_ms: 50}\n", "") + "autoscaling: {prefill_requests_per_s: 1, "
     "decode_requests_per_s: 2}\n", "spec.yaml:22: autoscaling: keeps the objectives in `slo`; set both"),
    (GOOD + "autoscaling: {prefill_requests_per_s: 1, decode_requests_per_s: 2, cooldown_s: 60}\n",
     "spec.yaml:23: autoscaling.cooldown_s: unknown field; did you mean 'scale_down_cooldown_s'?"),
])
def test_bad_spec_names_file_line_field_and_fix(text: str, expected: str) -> None:
    assert expected in problems_of(text)


def test_every_problem_is_reported_at_once_in_line_order() -> None:
    text = replace("engine: vllm", "engine: vlm").replace("ttft_ms: 500", "ttft_ms: 0").replace(
        "policy: kv_aware", "policy: fastest")
    error = pytest.raises(SpecError, parse_spec, text, source="spec.yaml").value
    assert [(p.line, p.path) for p in error.problems] == [
        (5, "model.engine"), (19, "router.policy"), (20, "slo.ttft_ms")]
    assert str(error).startswith("3 problems in the deployment spec:\n  spec.yaml:5: model.engine:")


def test_good_spec_compiles_to_placed_workers_with_devices_ports_and_pairings() -> None:
    plan = compile_spec(parse_spec(GOOD))
    rows = [(p.id, p.host, p.port, p.devices, p.env.get("CUDA_VISIBLE_DEVICES")) for p in plan.processes]
    assert rows == [
        ("prefill-0", "node-a", 50100, (0, 1), "0,1"),
        ("prefill-1", "node-b", 50100, (0, 1), "0,1"),
        ("prefill-2", "node-a", 50101, (2, 3), "2,3"),
        ("prefill-3", "node-b", 50101, (2, 3), "2,3"),
        ("decode-0", "node-a", 50102, (4, 5), "4,5"),
        ("decode-1", "node-b", 50102, (4, 5), "4,5"),
        ("router", "node-a", 50051, (), None),
        ("control-plane", "node-a", 50052, (), None),
    ]
    assert plan.by_role("decode")[1].endpoint == "10.0.0.2:50102"
    assert plan.pairings[:2] == (("prefill-0", "decode-0", True), ("prefill-1", "decode-1", True))
    assert len(plan.pairings) == 8 and sum(same for *_, same in plan.pairings) == 4
    assert plan.by_role("prefill")[0].command == (
        "dynamo-grpc", "prefill", "--host", "0.0.0.0", "--port", "50100", "--advertise-host", "10.0.0.1",
        "--node-name", "node-a", "--etcd", "10.0.0.1:2379", "--namespace", "llama-disagg",
        "--metrics-port", "51100", "--worker-id", "prefill-0", "--engine", "vllm",
        "--model-path", "/models/llama-3-8b",
        "--model", "llama-3-8b", "--dtype", "bfloat16", "--max-model-len", "8192",
        "--max-num-batched-tokens", "8192", "--kv-ttl-s", "30", "--kv-pull-failure", "local-prefill")
    assert "--max-num-batched-tokens" not in plan.by_role("decode")[0].command
    assert compile_spec(parse_spec(GOOD)) == plan
    assert plan_to_json(compile_spec(parse_spec(GOOD))) == plan_to_json(plan)


def test_compiled_commands_parse_with_the_real_cli() -> None:
    plan = compile_spec(parse_spec(GOOD))
    for process in plan.processes:
        assert process.command[0] == "dynamo-grpc"
        args = build_parser().parse_args(list(process.command[1:]))
        assert args.command == process.role
        server = server_config(args)
        assert (server.port, server.node_name, server.endpoint(server.port)) == (
            process.port, process.host, process.endpoint)
        assert process.metrics_url == f"http://{process.address}:{server.metrics_port}/metrics"
        if process.role in ("prefill", "decode"):
            worker = worker_config(args)
            assert worker.worker_id == process.id
            assert worker.kv_pull_failure == "local-prefill" and worker.kv_ttl_s == 30
            engine = worker.engine
            assert isinstance(engine, VllmEngineConfig)
            assert (engine.model_path, engine.model, engine.dtype, engine.max_model_len) == (
                "/models/llama-3-8b", "llama-3-8b", "bfloat16", 8192)
            assert engine.max_num_batched_tokens == (8192 if process.role == "prefill" else 0)


def test_plan_outputs_text_json_and_proto() -> None:
    plan = compile_spec(parse_spec(GOOD))
    text = render_plan(plan)
    assert "prefill-0      prefill        node-a  10.0.0.1:50100  0,1      2" in text
    assert "prefill-0 -> same host: decode-0; other hosts: decode-1" in text
    assert "CUDA_VISIBLE_DEVICES=0,1 dynamo-grpc prefill --host 0.0.0.0" in text
    assert "a vllm worker runs one rank" in text and "kv_aware" in text
    data = json.loads(plan_to_json(plan))
    assert data["processes"][0]["shell"].startswith("CUDA_VISIBLE_DEVICES=0,1 dynamo-grpc prefill")
    assert data["processes"][0]["metrics"] == "http://10.0.0.1:51100/metrics"
    assert "metrics: every process serves Prometheus /metrics on its port + 1000 (router: " \
           "http://10.0.0.1:51051/metrics)" in plan.notes
    assert data["pairings"][0] == {"prefill": "prefill-0", "decode": "decode-0", "same_host": True}
    proto = plan.to_proto()
    assert proto.model == "llama-3-8b" and len(proto.workers) == 7
    assert proto.workers[0].role == pb.WORKER_ROLE_PREFILL and list(proto.workers[0].devices) == [0, 1]
    assert proto.workers[0].engine_args["max_num_batched_tokens"] == "8192"
    assert plan.pairing_table(version=3).pairings[0].same_host


@pytest.mark.parametrize("name", ["disagg_8gpu.yaml", "tiny_cpu.yaml", "autoscaled_sim.yaml"])
def test_examples_compile_and_round_trip(name: str) -> None:
    spec = load_spec(EXAMPLES / name)
    assert parse_spec(dump_spec(spec)) == spec
    plan = compile_spec(spec)
    for process in plan.processes:
        build_parser().parse_args(list(process.command[1:]))
    if name == "tiny_cpu.yaml":
        assert [p.devices for p in plan.workers] == [(), ()]
        assert [p.cpus for p in plan.workers] == ["0", "1"]
        assert plan.workers[0].command[2:4] == ("--host", "127.0.0.1")


def test_vllm_tp8_single_node_becomes_four_plus_four() -> None:
    spec, notes = spec_from_vllm(["vllm", "serve", "meta-llama/Llama-3.1-8B-Instruct", "--tensor-parallel-size", "8",
                                  "--max-model-len", "8192", "--dtype", "bfloat16"])
    assert (spec.prefill.workers, spec.prefill.tensor_parallel_size) == (4, 1)
    assert (spec.decode.workers, spec.decode.tensor_parallel_size) == (4, 1)
    assert spec.hosts[0].gpus == 8
    assert spec.model.path == spec.model.served_name == "meta-llama/Llama-3.1-8B-Instruct"
    assert spec.model.engine_args["max_model_len"] == 8192 and spec.model.engine_args["dtype"] == "bfloat16"
    assert any(note.startswith("sizing: 8 GPUs split half and half; TP 1") for note in notes)
    plan = compile_spec(spec)
    assert [p.devices for p in plan.workers] == [(i,) for i in range(8)]


def test_vllm_flags_kept_dropped_and_noted() -> None:
    spec, notes = spec_from_vllm([
        "vllm", "serve", "my-org/custom-model", "-tp", "2", "--max-num-seqs=64", "--block-size", "16",
        "--enforce-eager", "--served-model-name", "custom", "--host", "0.0.0.0", "--port", "8000",
        "--gpu-memory-utilization=0.85", "--trust-remote-code", "--max_num_batched_tokens",
        "4096", "--pipeline-parallel-size", "2"])
    args = spec.model.engine_args
    assert (args["max_num_seqs"], args["block_size"], args["enforce_eager"], args["max_num_batched_tokens"]) == (
        64, 16, True, 4096)
    assert spec.model.served_name == "custom" and spec.name == "custom"
    assert spec.model.extra_engine_args == {"gpu_memory_utilization": "0.85", "trust_remote_code": True}
    joined = "\n".join(notes)
    for flag in ("--host", "--port"):
        assert f"{flag} dropped: a setting of vLLM's OpenAI HTTP frontend" in joined
    assert "--pipeline-parallel-size 2 dropped: pipeline parallelism is not supported" in joined
    assert "--gpu-memory-utilization kept verbatim under model.engine_args.extra" in joined
    # No size in the name: the user's TP 2 stays (4 GPUs used -> 2 per pool -> 1 worker each).
    assert (spec.hosts[0].gpus, spec.prefill.tensor_parallel_size, spec.prefill.workers) == (4, 2, 1)
    # Kept flags reach every vLLM worker as --vllm-arg, which the worker checks against vLLM's own arguments.
    plan = compile_spec(spec)
    for process in plan.workers:
        command = " ".join(process.command)
        assert "--vllm-arg gpu_memory_utilization=0.85 --vllm-arg trust_remote_code=true" in command
        config = worker_config(build_parser().parse_args(list(process.command[1:])))
        assert config.engine.extra_args == ("gpu_memory_utilization=0.85", "trust_remote_code=true")
    assert "not passed" not in render_plan(plan)
    with pytest.raises(ConfigError, match="did you mean 'gpu_memory_utilization'"):
        worker_config(build_parser().parse_args(["prefill", "--vllm-arg", "gpu_memory_utilisation=0.9"]))
    with pytest.raises(ConfigError, match="one engine rank"):
        worker_config(build_parser().parse_args(["decode", "--vllm-arg", "tensor_parallel_size=2"]))
    with pytest.raises(ConfigError, match="does not apply to --engine simulated"):
        worker_config(build_parser().parse_args(["prefill", "--engine", "simulated", "--vllm-arg", "seed=1"]))


def test_vllm_api_key_and_certificates_secure_every_process(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    node = ca.issue("node")
    key_file = tmp_path / "router.key"
    spec, notes = spec_from_vllm(["vllm", "serve", "org/model-8B", "--api-key", "s3cret", "--ssl-certfile",
                                  str(node.cert), "--ssl-keyfile", str(node.key), "--ssl-ca-certs", str(ca.cert)],
                                 api_key_file=key_file)
    # The key is in a file only its owner reads, which the spec names; the certificates are the spec's.
    assert key_file.read_text() == "s3cret\n" and key_file.stat().st_mode & 0o777 == 0o600
    assert "s3cret" not in dump_spec(spec) and "s3cret" not in "\n".join(notes)
    assert spec.security.to_dict() == {"tls_cert": str(node.cert), "tls_key": str(node.key), "tls_ca": str(ca.cert),
                                       "auth_token_file": str(key_file)}
    assert parse_spec(dump_spec(spec)).security == spec.security
    assert "--ssl-ca-certs: security.tls_ca, for every process (mutual TLS" in "\n".join(notes)
    # Every process serves mutual TLS with the node's certificate; the router alone requires the key.
    plan = compile_spec(spec)
    for process in plan.processes:
        config = server_config(build_parser().parse_args(list(process.command[1:])))
        assert config.tls is not None and config.tls.mutual, process.id
        assert config.auth_token == ("s3cret" if process.role == "router" else None), process.id
    with pytest.raises(SpecError, match="security.tls_ca: needs tls_cert and tls_key"):
        parse_spec(dump_spec(spec).replace("  tls_cert:", "  #").replace("  tls_key:", "  #"))


def test_vllm_flag_table_decides_values_negations_and_drops() -> None:
    spec, notes = spec_from_vllm(["vllm", "serve", "--enable-prefix-caching", "org/model-8B",
                                  "--no-enforce-eager", "--disable-log-stats", "--kv-connector", "X",
                                  "--no-trust-remote-code"])
    assert spec.model.path == "org/model-8B"  # a switch takes no value, so the model is the positional
    assert spec.model.engine_args["enforce_eager"] is False
    assert spec.model.extra_engine_args == {"enable_prefix_caching": True, "no_trust_remote_code": True}
    joined = "\n".join(notes)
    assert "--disable-log-stats dropped: workers always collect engine stats" in joined
    assert "--kv-connector dropped: dynamo-grpc configures its own KV connector" in joined


def test_vllm_api_server_form_and_cpu_host() -> None:
    spec, notes = spec_from_vllm(["python3", "-m", "vllm.entrypoints.openai.api_server", "--model",
                                  "/models/tiny-llama", "--dtype=float32", "--device", "cpu"])
    assert spec.model.path == "/models/tiny-llama" and spec.hosts[0].gpus == 0
    assert (spec.prefill.workers, spec.decode.workers) == (1, 1)
    assert spec.model.engine_args["dtype"] == "float32"
    assert any("CPU host" in note for note in notes)
    plan = compile_spec(spec)
    for process in plan.workers:
        worker_config(build_parser().parse_args(list(process.command[1:])))


def test_vllm_big_model_keeps_tp_and_bad_commands_are_refused() -> None:
    spec, _ = spec_from_vllm(["--", "vllm", "serve", "meta-llama/Llama-3.1-70B-Instruct", "-tp", "8"])
    assert (spec.prefill.workers, spec.prefill.tensor_parallel_size) == (1, 4)
    with pytest.raises(ValueError, match="no model given"):
        spec_from_vllm(["vllm", "serve", "--dtype", "bfloat16"])
    with pytest.raises(ValueError, match="--max-model-len expects an integer"):
        spec_from_vllm(["vllm", "serve", "m", "--max-model-len", "big"])
    with pytest.raises(ValueError, match="expected `vllm serve"):
        spec_from_vllm(["vllm", "bench", "m"])
    with pytest.raises(ValueError, match="--served-model-name needs a name"):
        spec_from_vllm(["vllm", "serve", "m", "--served-model-name="])


def test_kubernetes_manifests_parse_back_with_gpu_requests(tmp_path: Path) -> None:
    plan = compile_spec(parse_spec(GOOD))
    paths = write_manifests(plan, tmp_path, image="registry/dynamo-grpc:1", images={"router": "registry/router:1"},
                            namespace="serving", etcd_endpoints="etcd.serving:2379")
    assert sorted(p.name for p in paths) == ["README.md", "control-plane.yaml", "decode.yaml", "prefill.yaml",
                                             "router.yaml"]
    docs = {p.stem: list(yaml.safe_load_all(p.read_text())) for p in paths if p.suffix == ".yaml"}
    prefill = docs["prefill"][0]
    assert (prefill["kind"], prefill["metadata"]["name"], prefill["metadata"]["namespace"]) == (
        "Deployment", "llama-disagg-prefill", "serving")
    assert prefill["spec"]["replicas"] == 4 and docs["decode"][0]["spec"]["replicas"] == 2
    container = prefill["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert container["image"] == "registry/dynamo-grpc:1"
    args = build_parser().parse_args(container["args"])
    assert worker_config(args).server.etcd == ("etcd.serving:2379",)
    assert [d["kind"] for d in docs["router"]] == ["Deployment", "Service"]
    assert docs["router"][1]["spec"]["ports"][0]["port"] == 50051
    router = docs["router"][0]["spec"]["template"]["spec"]["containers"][0]
    assert router["image"] == "registry/router:1" and "resources" not in router
    first = {p.name: p.read_text() for p in paths}
    write_manifests(plan, tmp_path, image="registry/dynamo-grpc:1", images={"router": "registry/router:1"},
                    namespace="serving", etcd_endpoints="etcd.serving:2379")
    assert {p.name: p.read_text() for p in paths} == first


def test_spec_from_file_reports_its_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(GOOD).replace("gpus: 8}\n  - {name: node-b", "gpus: eight}\n  - {name: node-b"))
    with pytest.raises(SpecError, match=rf"{path}:8: hosts\[0\].gpus: expected an integer, got 'eight'"):
        load_spec(path)


async def test_the_control_plane_publishes_a_compiled_plan() -> None:
    from control_plane.compiler import compile_spec
    from control_plane.role import start_control_plane
    from control_plane.spec import load_spec
    from dynamo_grpc.config import ServerConfig
    from dynamo_grpc.registry import MemoryRegistry
    from dynamo_grpc.v1 import control_plane_pb2 as cp_pb
    from dynamo_grpc.v1 import control_plane_pb2_grpc as cp_grpc

    plan = compile_spec(load_spec(EXAMPLES / "disagg_8gpu.yaml")).to_proto()
    registry = MemoryRegistry()
    role = await start_control_plane(ServerConfig(port=0), registry, plan=plan)
    try:
        async with grpc.aio.insecure_channel(role.endpoint) as channel:
            served = (await cp_grpc.ControlPlaneServiceStub(channel).GetPlan(cp_pb.GetPlanRequest())).plan
        assert served == plan and len(served.workers) == 9
    finally:
        await role.stop()
        await registry.close()


def test_no_prefill_workers_is_an_aggregated_deployment() -> None:
    plan = compile_spec(parse_spec(replace("prefill:\n  workers: 4", "prefill:\n  workers: 0"), source="spec.yaml"))
    assert {p.role for p in plan.workers} == {"decode"} and plan.pairings == ()
    assert any("aggregated" in note for note in plan.notes)
    assert "must be at least 1" in problems_of(replace("decode:\n  workers: 2", "decode:\n  workers: 0"))


def test_autoscaling_compiles_to_control_plane_and_router_flags() -> None:
    from dynamo_grpc.cli import autoscaling_config

    spec = parse_spec(GOOD + "autoscaling: {prefill_requests_per_s: 1.5, decode_requests_per_s: 2.5, "
                      "interval_s: 5, idle_to_zero_s: 0}\n")
    assert parse_spec(dump_spec(spec)) == spec
    plan = compile_spec(spec)
    assert plan.autoscaling and any(n.startswith("autoscaling: the control plane runs 0..4 prefill and 0..2 decode") for n in plan.notes)
    control_plane = build_parser().parse_args(list(plan.by_role("control-plane")[0].command[1:]))
    config = autoscaling_config(control_plane)
    assert config is not None
    assert (config.capacity.prefill_rps, config.capacity.decode_rps, config.max_prefill, config.max_decode) == (
        1.5, 2.5, 4, 2)
    assert (config.objectives.ttft_ms, config.objectives.itl_ms, config.tuning.interval_s,
            config.tuning.idle_to_zero_s) == (500, 50, 5, 0)
    assert config.autoscaler()._idle_to_zero_s == float("inf")  # 0: never to zero
    router = build_parser().parse_args(list(plan.by_role("router")[0].command[1:]))
    assert router.cold_start_wait_s == 120
    # Without the section nothing autoscales.
    plain = compile_spec(parse_spec(GOOD))
    assert not plain.autoscaling
    assert autoscaling_config(build_parser().parse_args(list(plain.by_role("control-plane")[0].command[1:]))) is None
    with pytest.raises(ConfigError, match="--slo-itl-ms must be positive"):
        autoscaling_config(build_parser().parse_args(
            ["control-plane", "--autoscale-prefill-rps", "1", "--autoscale-decode-rps", "1", "--slo-ttft-ms", "9"]))


def test_every_autoscaling_knob_reaches_the_autoscaler_from_the_spec() -> None:
    from control_plane.autoscaler import AutoscalingTuning, tuning_knobs
    from dynamo_grpc.cli import autoscaling_config

    halves = {knob.name: knob.default / 2 for knob in tuning_knobs()}
    assert set(halves) == {"target_utilisation", "interval_s", "rate_window_s", "scale_down_cooldown_s",
                           "settle_s", "idle_to_zero_s"}
    fields = ", ".join(f"{name}: {value:g}" for name, value in halves.items())
    spec = parse_spec(GOOD + f"autoscaling: {{prefill_requests_per_s: 1.5, decode_requests_per_s: 2.5, "
                      f"{fields}}}\n")
    assert spec.autoscaling is not None and spec.autoscaling.tuning == AutoscalingTuning(**halves)
    assert parse_spec(dump_spec(spec)) == spec
    command = compile_spec(spec).by_role("control-plane")[0].command
    config = autoscaling_config(build_parser().parse_args(list(command[1:])))
    assert config is not None and config.tuning == spec.autoscaling.tuning
    assert config.autoscaler().tuning == AutoscalingTuning(**halves)


def test_simulated_workers_take_the_pools_tensor_parallel_size() -> None:
    from dynamo_grpc.engine.cost_model import TensorParallelStepCost
    from dynamo_grpc.engine.simulated import SimulatedEngine, SimulatedEngineConfig

    spec = parse_spec(textwrap.dedent("""\
        name: sim-tp
        model: {served_name: sim-70b, engine: simulated, engine_args: {cost_model: llama3_70b}}
        hosts: [{name: node-a, address: 10.0.0.1, gpus: 8}]
        prefill: {workers: 1, tensor_parallel_size: 4}
        decode: {workers: 1, tensor_parallel_size: 4}
        etcd: [10.0.0.1:2379]
        """))
    plan = compile_spec(spec)
    assert not any("runs one rank" in note for note in plan.notes)
    engines = []
    for process in plan.workers:
        engine = worker_config(build_parser().parse_args(list(process.command[1:]))).engine
        assert isinstance(engine, SimulatedEngineConfig) and engine.tensor_parallel_size == 4
        engines.append(SimulatedEngine(engine))
    assert isinstance(engines[0]._cost, TensorParallelStepCost) and engines[0].fingerprint.endswith("/tp4")
    assert engines[0].fingerprint == engines[1].fingerprint  # the pools pair
    one_gpu = SimulatedEngine(SimulatedEngineConfig(cost_model="llama3_70b"))
    assert engines[0]._cost.step_ms(512, 0, 0, 0) < one_gpu._cost.step_ms(512, 0, 0, 0)
    # TP is the pool's setting, and a simulated TP needs a cost model to price it.
    assert "set by the pool; use prefill.tensor_parallel_size" in problems_of(
        GOOD.replace("max_model_len: 8192", "max_model_len: 8192, tensor_parallel_size: 2"))
    with pytest.raises(SpecError, match="tensor_parallel_size above 1 needs a cost_model"):
        parse_spec(dump_spec(spec).replace("cost_model: llama3_70b", "decode_step_s: 0.01"))
    # vLLM workers run one rank whatever the pool says, and the plan says so.
    assert any("runs one rank" in note for note in compile_spec(parse_spec(GOOD)).notes)


CPU_HOSTS = """\
name: cpu-pair
model: {path: /models/tiny, served_name: tiny, engine: vllm}
hosts:
  - {name: big, address: 10.0.0.1, gpus: 0, cpus: 32}
  - {name: small, address: 10.0.0.2, gpus: 0, cpus: 2}
prefill: {workers: 3, hosts: [big, small]}
decode: {workers: 3, hosts: [big, small]}
etcd: [10.0.0.1:2379]
"""


def test_cpu_hosts_split_their_cores_between_engine_workers() -> None:
    plan = compile_spec(parse_spec(CPU_HOSTS, source="spec.yaml"))
    # big: prefill-0, prefill-2, decode-0, decode-2 in plan order, 8 cores each; small: one core each.
    assert {p.id: p.cpus for p in plan.workers} == {
        "prefill-0": "0-7", "prefill-2": "8-15", "decode-0": "16-23", "decode-2": "24-31",
        "prefill-1": "0", "decode-1": "1"}
    for process in plan.workers:
        args = build_parser().parse_args(list(process.command[1:]))
        assert worker_config(args).engine.cpus == process.cpus == process.engine_args["cpus"]
        assert process.command[-2:] == ("--cpus", process.cpus) and "--cpus" not in process.engine_flags
    assert all(p.cpus == "" for p in plan.processes if p.role in ("router", "control-plane"))
    assert "host 'big': each engine worker runs on CPUs of its own (prefill-0 0-7, prefill-2 8-15, " \
           "decode-0 16-23, decode-2 24-31)" in plan.notes
    assert "prefill-1      prefill        small  10.0.0.2:50100  cpus 0" in render_plan(plan)
    assert plan.to_proto().workers[1].engine_args["cpus"] == "0"
    spec = parse_spec(CPU_HOSTS)
    assert parse_spec(dump_spec(spec)) == spec and spec.host("big").cpus == 32


def test_cpu_split_is_left_to_the_engines_when_cores_are_unknown_or_too_few() -> None:
    plan = compile_spec(parse_spec(CPU_HOSTS.replace(", cpus: 32", "").replace("cpus: 2", "cpus: 1")))
    assert [p.cpus for p in plan.workers] == [""] * 6
    assert not any("--cpus" in p.command for p in plan.processes)
    assert ("host 'big' does not say its cpus: its 4 engine workers each bind their threads on their own, "
            "maybe all to the same cores; give the host `cpus: N` to split its cores between them"
            ) in plan.notes
    assert "host 'small' has 1 cpus for 2 engine workers: they share them, each engine binding its threads " \
           "on its own" in plan.notes


def test_a_pools_own_cpus_win_over_the_split() -> None:
    text = CPU_HOSTS.replace("prefill: {workers: 3, hosts: [big, small]}",
                             "prefill: {workers: 3, hosts: [big, small], engine_args: {cpus: 0-3}}")
    plan = compile_spec(parse_spec(text))
    assert {p.id: p.cpus for p in plan.workers} == {
        "prefill-0": "", "prefill-1": "", "prefill-2": "", "decode-0": "0-15", "decode-2": "16-31",
        "decode-1": "0-1"}
    for process in plan.by_role("prefill"):
        assert worker_config(build_parser().parse_args(list(process.command[1:]))).engine.cpus == "0-3"
        assert process.command.count("--cpus") == 1


@pytest.mark.parametrize(("change", "expected"), [
    (("cpus: 32", "cpus: -1"), "spec.yaml:4: hosts[0].cpus: must be at least 0, got -1"),
    (("gpus: 0, cpus: 32", "gpus: 8, cpus: 32"),
     ("spec.yaml:4: hosts[0].cpus: cpus splits a CPU host's cores between its engine workers; a GPU host's "
      "workers run on their GPUs: remove cpus or set gpus: 0")),
    (("decode: {workers: 3, hosts: [big, small]}",
      "decode: {workers: 3, hosts: [big, small], engine_args: {cpus: 3-1}}"),
     "decode.engine_args: cpus: expected CPU ids like 0-3,8, got '3-1'"),
])
def test_bad_cpus_are_refused_with_the_fix(change: tuple[str, str], expected: str) -> None:
    assert change[0] in CPU_HOSTS
    with pytest.raises(SpecError) as caught:
        parse_spec(CPU_HOSTS.replace(*change), source="spec.yaml")
    assert expected in str(caught.value)


def _router_workers(plan) -> int:  # type: ignore[no-untyped-def]
    router = plan.by_role("router")[0]
    assert build_parser().parse_args(list(router.command[1:])).workers == router.processes
    return router.processes


def test_the_router_runs_one_process_per_core_its_host_leaves_free() -> None:
    # The engines hold every core of a CPU host they split: one router process.
    assert _router_workers(compile_spec(parse_spec(CPU_HOSTS))) == 1
    # Engines that do not run on the host's CPUs leave it all to the router.
    simulated = CPU_HOSTS.replace("engine: vllm", "engine: simulated")
    plan = compile_spec(parse_spec(simulated))
    assert _router_workers(plan) == 32
    assert "router         router         big    10.0.0.1:50051  -        -   32" in render_plan(plan)
    # A host that does not say its cores: the router counts them when it starts.
    plan = compile_spec(parse_spec(simulated.replace(", cpus: 32", "")))
    assert _router_workers(plan) == 0 and plan.by_role("router")[0].command[-2:] == ("--workers", "auto")
    assert "auto (1 per core)" in render_plan(plan)
    # The spec's own count wins, and survives a round trip.
    spec = parse_spec(simulated + "router: {workers: 3}\n")
    assert _router_workers(compile_spec(spec)) == 3 and parse_spec(dump_spec(spec)) == spec
