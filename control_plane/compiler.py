"""Spec -> plan: every process of a deployment with its host, devices, port and exact command line.

The plan is what an operator (or the Kubernetes writer) runs; compiling the same spec always gives the
same plan, so plans can be diffed and reviewed. Allocation rules:
- workers are placed round-robin over their pool's hosts (`pool_placement`), prefill pool first;
- on each GPU host, workers take consecutive GPU indices in that order, `tensor_parallel_size` each
  (handed over as CUDA_VISIBLE_DEVICES); CPU hosts give no devices, but a CPU host that says its `cpus`
  splits them evenly between its workers, in that order, for an engine that runs on CPUs (`--cpus`);
- on each host, workers take consecutive ports from `base_port` in that order, skipping the router's
  and control plane's ports; every process serves Prometheus /metrics on its port + METRICS_PORT_OFFSET;
- worker ids are `<role>-<index>`; the initial pairing table is `compute_pairings` over the planned
  workers (same-host pairs first), with engine fingerprints predicted from the KV-layout arguments.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
from dataclasses import asdict, dataclass, field
from typing import Any

from control_plane.autoscaler import tuning_knobs
from control_plane.spec import PoolSpec, Spec, engine_arg_defaults, pool_placement
from dynamo_grpc.engine import cpu_cores
from dynamo_grpc.engine.registry import ENGINES
from dynamo_grpc.routing.pairing import compute_pairings
from dynamo_grpc.routing.policies import routing_policy
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb

PROGRAM = "dynamo-grpc"
METRICS_PORT_OFFSET = 1000
_ROLE_ENUM = {"prefill": pb.WORKER_ROLE_PREFILL, "decode": pb.WORKER_ROLE_DECODE, "router": pb.WORKER_ROLE_ROUTER}


@dataclass(frozen=True)
class PlannedProcess:
    """One process of the deployment: a worker, the router or the control plane."""

    id: str
    role: str
    host: str
    address: str
    port: int
    command: tuple[str, ...]
    devices: tuple[int, ...] = ()
    tensor_parallel_size: int = 1
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Resolved engine arguments (model path and served name included); empty for router and control plane."""
    engine_flags: tuple[str, ...] = ()
    """The command's flags that every worker of the pool shares (engine and KV transfer), for other targets."""
    env: dict[str, str] = field(default_factory=dict)
    cpus: str = ""
    """The CPU ids of a CPU host that this worker's engine runs on; empty where it keeps its own binding."""
    processes: int = 1
    """Processes serving the port together (the router's `--workers`); 0: one per core of the host, counted
    when it starts (a host whose cores the spec does not say)."""

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def metrics_port(self) -> int:
        """Where the process serves its Prometheus metrics (`--metrics-port`)."""
        return self.port + METRICS_PORT_OFFSET

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{self.metrics_port}/metrics"

    def shell(self) -> str:
        """The command as one shell line, environment first."""
        env = [f"{name}={shlex.quote(value)}" for name, value in sorted(self.env.items())]
        return " ".join(env + [shlex.join(self.command)])


@dataclass(frozen=True)
class Plan:
    name: str
    namespace: str
    model: str
    engine: str
    etcd: tuple[str, ...]
    processes: tuple[PlannedProcess, ...]
    pairings: tuple[tuple[str, str, bool], ...]
    """(prefill id, decode id, same host), same-host pairs first."""
    router_policy: str
    min_uncached_tokens: int
    slo: dict[str, float]
    transfer: dict[str, Any]
    autoscaling: bool = False
    """The control plane sizes the pools; supervisors run the workers its scale target names."""
    notes: tuple[str, ...] = ()

    def by_role(self, role: str) -> list[PlannedProcess]:
        return [p for p in self.processes if p.role == role]

    @property
    def workers(self) -> list[PlannedProcess]:
        return [p for p in self.processes if p.role in ("prefill", "decode")]

    def to_proto(self) -> cp_pb.Plan:
        """The plan as ControlPlaneService.GetPlan serves it (the proto has no control-plane role)."""
        return cp_pb.Plan(model=self.model, workers=[
            cp_pb.PlannedWorker(name=p.id, role=_ROLE_ENUM[p.role], host=p.host, port=p.port, devices=p.devices,
                                engine_args={k: _flag_value(v) for k, v in p.engine_args.items()})
            for p in self.processes if p.role in _ROLE_ENUM])

    def pairing_table(self, version: int = 0) -> cp_pb.PairingTable:
        return cp_pb.PairingTable(version=version, pairings=[
            cp_pb.Pairing(prefill_worker_id=p, decode_worker_id=d, same_host=same) for p, d, same in self.pairings])


def compile_spec(spec: Spec) -> Plan:
    """Turn a checked spec into the concrete, deterministic plan."""
    next_port: dict[str, int] = {}
    next_gpu: dict[str, int] = {}
    fixed_ports = {(spec.router.host, spec.router.port), (spec.control_plane.host, spec.control_plane.port)}

    def take_port(host: str) -> int:
        port = next_port.get(host, spec.base_port)
        while (host, port) in fixed_ports:
            port += 1
        next_port[host] = port + 1
        return port

    def take_devices(host: str, count: int) -> tuple[int, ...]:
        if spec.host(host).gpus == 0:
            return ()
        first = next_gpu.get(host, 0)
        next_gpu[host] = first + count
        return tuple(range(first, first + count))

    processes: list[PlannedProcess] = []
    cores = _cpu_shares(spec)
    cpus_field = ENGINES[spec.model.engine].cpus_field
    for pool in spec.pools():
        engine_args = _resolved_engine_args(spec, pool)
        engine_flags = _engine_flags(spec, pool, engine_args)
        for index, host in enumerate(pool_placement(pool)):
            worker_id = f"{pool.role}-{index}"
            port = take_port(host)
            devices = take_devices(host, pool.tensor_parallel_size)
            command = (*_server_command(spec, pool.role, host, port), "--worker-id", worker_id, *engine_flags)
            env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, devices))} if devices else {}
            cpus = cores.get(worker_id, "")
            own_args = {**engine_args, cpus_field: cpus} if cpus else engine_args
            if cpus:
                command = (*command, f"--{cpus_field.replace('_', '-')}", cpus)
            processes.append(PlannedProcess(
                id=worker_id, role=pool.role, host=host, address=spec.host(host).address, port=port,
                command=command, devices=devices, tensor_parallel_size=pool.tensor_parallel_size,
                engine_args=own_args, engine_flags=engine_flags, env=env, cpus=cpus))
    for role, host, port in (("router", spec.router.host, spec.router.port),
                             ("control-plane", spec.control_plane.host, spec.control_plane.port)):
        command = _server_command(spec, role, host, port)
        if role == "router":
            command = (*command, "--policy", spec.router.policy)
            kind = ENGINES[spec.model.engine]
            if routing_policy(spec.router.policy).uses_prefix_cache and kind.tokenize_text is None:
                command = (*command, "--tokenizer", spec.model.path)  # to look text prompts up
            if spec.router.min_uncached_tokens:
                command = (*command, "--disagg-min-prompt-tokens", str(spec.router.min_uncached_tokens))
            if spec.autoscaling is not None:
                command = (*command, "--cold-start-wait-s", _flag_value(spec.autoscaling.cold_start_wait_s))
            count = _router_processes(spec, processes)
            command = (*command, "--workers", str(count) if count else "auto")
        elif spec.autoscaling is not None:
            command = (*command, *_autoscaling_flags(spec))
        processes.append(PlannedProcess(id=role, role=role, host=host, address=spec.host(host).address, port=port,
                                        command=command, processes=count if role == "router" else 1))
    pairings = _initial_pairings(spec, processes)
    return Plan(
        name=spec.name, namespace=spec.namespace, model=spec.model.served_name, engine=spec.model.engine,
        etcd=spec.etcd, processes=tuple(processes), pairings=pairings, router_policy=spec.router.policy,
        min_uncached_tokens=spec.router.min_uncached_tokens,
        slo={k: v for k, v in (("ttft_ms", spec.slo.ttft_ms), ("itl_ms", spec.slo.itl_ms)) if v is not None},
        transfer={"kv_ttl_s": spec.transfer.kv_ttl_s, "on_pull_failure": spec.transfer.on_pull_failure},
        autoscaling=spec.autoscaling is not None,
        notes=tuple(_notes(spec, pairings) + _cpu_notes(spec, cores) + _metrics_notes(processes)))


def _router_processes(spec: Spec, planned: list[PlannedProcess]) -> int:
    """Router processes on its host: the spec's `router.workers`, else one per core of the host that no
    engine runs on (at least one); 0 where the host does not say its cores (the router counts them)."""
    if spec.router.workers:
        return spec.router.workers
    host = spec.host(spec.router.host)
    if not host.cpus:
        return 0
    taken = sum(len(cpu_cores.parse(p.cpus)) for p in planned if p.host == host.name and p.cpus)
    return max(1, host.cpus - taken)


def _cpu_workers(spec: Spec) -> dict[str, list[str]]:
    """CPU host -> the ids of its workers whose engine runs on CPUs and whose pool does not set the engine's
    cores itself, in plan order."""
    cpus_field = ENGINES[spec.model.engine].cpus_field
    placed: dict[str, list[str]] = {}
    if not cpus_field:
        return placed
    for pool in spec.pools():
        if cpus_field in spec.engine_args_for(pool):
            continue  # the user's own choice, on every worker of the pool
        for index, host in enumerate(pool_placement(pool)):
            if spec.host(host).gpus == 0:
                placed.setdefault(host, []).append(f"{pool.role}-{index}")
    return placed


def _cpu_shares(spec: Spec) -> dict[str, str]:
    """Worker id -> the CPU ids its engine runs on: each CPU host that says its `cpus` splits them evenly."""
    shares: dict[str, str] = {}
    for host, workers in _cpu_workers(spec).items():
        split = cpu_cores.split(tuple(range(spec.host(host).cpus)), len(workers))
        if split is not None:
            shares.update(zip(workers, map(cpu_cores.format_list, split)))
    return shares


def _cpu_notes(spec: Spec, shares: dict[str, str]) -> list[str]:
    notes = []
    for host, workers in _cpu_workers(spec).items():
        cpus = spec.host(host).cpus
        if workers[0] in shares:
            listed = ", ".join(f"{worker} {shares[worker]}" for worker in workers)
            notes.append(f"host {host!r}: each engine worker runs on CPUs of its own ({listed})")
        elif cpus:
            notes.append(f"host {host!r} has {cpus} cpus for {len(workers)} engine workers: they share them, "
                         "each engine binding its threads on its own")
        elif len(workers) > 1:
            notes.append(f"host {host!r} does not say its cpus: its {len(workers)} engine workers each "
                         "bind their threads on their own, maybe all to the same cores; give the host "
                         "`cpus: N` to split its cores between them")
    return notes


EXTRA = "extra."


def _resolved_engine_args(spec: Spec, pool: PoolSpec) -> dict[str, Any]:
    kind = ENGINES[spec.model.engine]
    args: dict[str, Any] = {kind.served_name_field: spec.model.served_name}
    if kind.model_path_field:
        args[kind.model_path_field] = spec.model.path
    args.update(spec.engine_args_for(pool))
    # Engine arguments without a worker flag of their own, passed through (`--vllm-arg`).
    args.update({f"{EXTRA}{name}": value for name, value in {**spec.model.extra_engine_args,
                                                              **pool.extra_engine_args}.items()})
    return args


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _engine_flags(spec: Spec, pool: PoolSpec, engine_args: dict[str, Any]) -> tuple[str, ...]:
    """--engine, the model, the engine arguments in the engine config's field order, the pool's TP where
    the engine takes it, then KV transfer (both settings on both roles: a worker ignores the one that is
    not its own)."""
    kind = ENGINES[spec.model.engine]
    flags = ["--engine", kind.name]
    if kind.model_path_field:
        flags += [f"--{kind.model_path_field.replace('_', '-')}", spec.model.path]
    flags += ["--model", spec.model.served_name]
    for name in engine_arg_defaults(kind.name):
        if name in engine_args:
            flags += [f"--{name.replace('_', '-')}", _flag_value(engine_args[name])]
    if pool.tensor_parallel_size > 1 and kind.takes_tensor_parallel:
        flags += ["--tensor-parallel-size", str(pool.tensor_parallel_size)]
    if kind.passthrough is not None:
        flags += [flag for name, value in engine_args.items() if name.startswith(EXTRA)
                  for flag in (f"--{kind.passthrough.flag}", f"{name.removeprefix(EXTRA)}={_flag_value(value)}")]
    flags += ["--kv-ttl-s", _flag_value(spec.transfer.kv_ttl_s), "--kv-pull-failure", spec.transfer.on_pull_failure]
    return tuple(flags)


def _autoscaling_flags(spec: Spec) -> tuple[str, ...]:
    """The control plane's autoscaler settings: each pool between zero and its planned workers."""
    scaling, slo = spec.autoscaling, spec.slo
    assert scaling is not None and slo.ttft_ms is not None and slo.itl_ms is not None
    flags = {"autoscale-prefill-rps": scaling.prefill_requests_per_s, "autoscale-decode-rps":
             scaling.decode_requests_per_s, "autoscale-max-prefill": spec.prefill.workers,
             "autoscale-max-decode": spec.decode.workers, "slo-ttft-ms": slo.ttft_ms,
             "slo-itl-ms": slo.itl_ms}
    flags.update({knob.flag: getattr(scaling.tuning, knob.name) for knob in tuning_knobs()})
    return tuple(part for name, value in flags.items() for part in (f"--{name}", _flag_value(value)))


def _bind_address(address: str) -> str:
    """Listen on every interface, except for a loopback host (nothing outside could reach it anyway)."""
    try:
        loopback = ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = address == "localhost"
    return address if loopback else "0.0.0.0"


def _server_command(spec: Spec, role: str, host: str, port: int) -> tuple[str, ...]:
    address = spec.host(host).address
    return (PROGRAM, role, "--host", _bind_address(address), "--port", str(port), "--advertise-host", address,
            "--node-name", host, "--etcd", ",".join(spec.etcd), "--namespace", spec.namespace,
            "--metrics-port", str(port + METRICS_PORT_OFFSET), *_security_flags(spec, role))


def _security_flags(spec: Spec, role: str) -> tuple[str, ...]:
    """Every process's TLS flags; the router's token file too."""
    security = spec.security
    given = {"tls-cert": security.tls_cert, "tls-key": security.tls_key, "tls-ca": security.tls_ca,
             "auth-token-file": security.auth_token_file if role == "router" else ""}
    return tuple(part for name, value in given.items() if value for part in (f"--{name}", value))


def _initial_pairings(spec: Spec, processes: list[PlannedProcess]) -> tuple[tuple[str, str, bool], ...]:
    """The control plane's first table, from the same rule it applies to live workers."""
    defaults = engine_arg_defaults(spec.model.engine)
    layout_args = ENGINES[spec.model.engine].kv_layout_args

    def fingerprint(p: PlannedProcess) -> str:
        layout = "/".join(f"{k}={p.engine_args.get(k, defaults[k])}" for k in layout_args)
        return f"{spec.model.engine}/{spec.model.served_name}/{layout}/tp{p.tensor_parallel_size}"

    infos = [pb.WorkerInfo(worker_id=p.id, role=_ROLE_ENUM[p.role], host=p.host, model=spec.model.served_name,
                           engine=spec.model.engine, engine_fingerprint=fingerprint(p))
             for p in processes if p.role in ("prefill", "decode")]
    table = compute_pairings(infos)
    return tuple((p.prefill_worker_id, p.decode_worker_id, p.same_host) for p in table.pairings)


def _notes(spec: Spec, pairings: tuple[tuple[str, str, bool], ...]) -> list[str]:
    """What the plan records but the runtime does not act on yet, and what the operator should know."""
    notes = []
    if not spec.prefill.workers:
        notes.append("prefill.workers is 0: aggregated serving, each decode worker prefills its own prompts")
    tp = spec.decode.tensor_parallel_size
    if tp > 1 and not ENGINES[spec.model.engine].takes_tensor_parallel:
        notes.append(f"tensor_parallel_size {tp}: each worker gets {tp} GPUs in CUDA_VISIBLE_DEVICES, but a "
                     f"{spec.model.engine} worker runs one rank (the KV connector moves one rank's blocks)")
    if spec.router.min_uncached_tokens and not routing_policy(spec.router.policy).uses_prefix_cache:
        notes.append(f"min_uncached_tokens {spec.router.min_uncached_tokens} counts every prompt token as "
                     f"uncached: only the kv_aware policy knows what workers cache")
    if spec.autoscaling is not None:
        pools = " and ".join(f"0..{pool.workers} {pool.role}" for pool in spec.pools() if pool.workers)
        notes.append(f"autoscaling: the control plane runs {pools} workers for the SLO targets; `up` starts "
                     "the workers its scale target names")
    elif spec.slo.ttft_ms is not None or spec.slo.itl_ms is not None:
        notes.append("SLO targets are recorded for sizing; nothing enforces them at run time (add autoscaling)")
    for where, extra in (("model", spec.model.extra_engine_args), ("prefill", spec.prefill.extra_engine_args),
                         ("decode", spec.decode.extra_engine_args)):
        if extra and ENGINES[spec.model.engine].passthrough is None:
            listed = ", ".join(f"{k}={_flag_value(v)}" for k, v in extra.items())
            notes.append(f"{where}.engine_args.extra not passed ({spec.model.engine} workers take none): {listed}")
    remote = sum(1 for *_, same in pairings if not same)
    if remote:
        notes.append(f"{remote} of {len(pairings)} pairs span hosts and move KV over gRPC (PullKv)")
    return notes


def _metrics_notes(processes: list[PlannedProcess]) -> list[str]:
    """Where Prometheus scrapes, and any metrics port that another process of its host listens on."""
    router = next(p for p in processes if p.role == "router")
    notes = [f"metrics: every process serves Prometheus /metrics on its port + {METRICS_PORT_OFFSET} "
             f"(router: {router.metrics_url})"]
    taken = {(p.host, p.port) for p in processes}
    notes += [f"{p.id}: metrics port {p.metrics_port} is another process's gRPC port on host {p.host!r}; "
              "change base_port" for p in processes if (p.host, p.metrics_port) in taken]
    return notes


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    out = asdict(plan)
    out["processes"] = [{**asdict(p), "endpoint": p.endpoint, "metrics": p.metrics_url, "shell": p.shell()}
                        for p in plan.processes]
    out["pairings"] = [{"prefill": p, "decode": d, "same_host": same} for p, d, same in plan.pairings]
    return out


def plan_to_json(plan: Plan) -> str:
    return json.dumps(plan_to_dict(plan), indent=2) + "\n"


def _devices(process: PlannedProcess) -> str:
    if process.devices:
        return ",".join(map(str, process.devices))
    return f"cpus {process.cpus}" if process.cpus else "-"


def render_plan(plan: Plan) -> str:
    """A table of processes, the pairing table, the commands and the notes, for people."""
    title = (f"plan {plan.name}: model {plan.model} ({plan.engine}), namespace {plan.namespace}, "
             f"etcd {','.join(plan.etcd)}")
    lines = [title, ""]
    header = ("ID", "ROLE", "HOST", "ENDPOINT", "DEVICES", "TP", "PROCESSES")
    rows = [(p.id, p.role, p.host, p.endpoint, _devices(p),
             str(p.tensor_parallel_size) if p.role in ("prefill", "decode") else "-",
             str(p.processes) if p.processes else "auto (1 per core)") for p in plan.processes]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    same = sum(1 for *_, s in plan.pairings if s)
    lines += ["", f"pairings: {len(plan.pairings)} ({same} same-host), router policy {plan.router_policy}"]
    for prefill in dict.fromkeys(p for p, _, _ in plan.pairings):
        near = [d for p, d, s in plan.pairings if p == prefill and s]
        far = [d for p, d, s in plan.pairings if p == prefill and not s]
        parts = [f"{label}: {', '.join(ids)}" for label, ids in (("same host", near), ("other hosts", far)) if ids]
        lines.append(f"  {prefill} -> {'; '.join(parts)}")
    lines += ["", "commands:"] + [f"  [{p.host}] {p.shell()}" for p in plan.processes]
    if plan.notes:
        lines += ["", "notes:"] + [f"  - {note}" for note in plan.notes]
    return "\n".join(lines) + "\n"
