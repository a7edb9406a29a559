"""Every engine a worker can run, by name, with what the rest of the system needs to know of it.

Adding an engine is an adapter module (the `Engine` protocol of `base.py`, and a frozen config dataclass
whose fields are the engine's arguments) plus one `EngineKind` in `ENGINES`. Workers, the command line,
the spec compiler, the router and the planner read this table; none of them names an engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Any

from dynamo_grpc.engine import simulated, vllm_engine
from dynamo_grpc.engine.base import Engine
from dynamo_grpc.kv.store import LeasedKvStore
from dynamo_grpc.kv.transport import KvReceiver


@dataclass(frozen=True)
class EngineParts:
    """What a worker hands the engine it starts."""

    kv_store: LeasedKvStore | None = None
    """A prefill worker's store, where the engine leases the KV it computes."""
    kv_receiver: KvReceiver | None = None
    """A decode worker's way to the KV its requests' handles name."""


@dataclass(frozen=True)
class Passthrough:
    """A repeatable `--FLAG KEY=VALUE` for engine arguments that have no flag of their own."""

    flag: str
    field: str
    """The config field that keeps the KEY=VALUE pairs."""
    check: Callable[[tuple[str, ...]], object]
    """Refuses a bad pair with a ValueError that names it."""
    help: str


@dataclass(frozen=True)
class EngineKind:
    name: str
    summary: str
    """One line for `--engine`'s help."""
    config: type[Any]
    """A frozen dataclass: each field is an engine argument and a worker flag."""
    start: Callable[[Any, EngineParts], Awaitable[Engine]]
    served_name_field: str
    """The config field that `--model` (the served name) sets."""
    kv_layout_args: tuple[str, ...]
    """Arguments that shape the KV bytes: prefill and decode pools must agree on them to pair."""
    plan_args: Callable[[str, float, int, int], tuple[dict[str, object], dict[str, object]]]
    """Engine arguments a planned pool needs for its sizing to hold, (every worker's, decode workers'), from
    (calibrated model shape, KV memory per worker in GB, largest decode batch, KV block size)."""
    model_path_field: str = ""
    """The config field naming the model's directory, which a deployment must give; routers read its
    tokenizer and frontends its chat template. Empty for an engine that needs no model files."""
    passthrough: Passthrough | None = None
    cpus_field: str = ""
    """The config field that confines the engine to a set of CPU ids (`cpu_cores`), for an engine that runs
    on CPUs: `serve` and a compiled plan's CPU hosts give each of its workers a share of their own."""
    tokenize_text: Callable[[str], tuple[int, ...]] | None = None
    """The engine's own tokenizer, for an engine that needs no model files to tokenize (else routers use
    the model's tokenizer from `model_path_field`)."""

    @property
    def takes_tensor_parallel(self) -> bool:
        """Whether a worker spans the pool's tensor-parallel size (`--tensor-parallel-size`)."""
        return "tensor_parallel_size" in self.argument_names

    @property
    def argument_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.config))

    @property
    def default_served_name(self) -> str:
        """The name a worker serves its model under when given none and no model directory."""
        return next(f.default for f in fields(self.config) if f.name == self.served_name_field)

    def model_path(self, config: Any) -> str:
        return getattr(config, self.model_path_field) if self.model_path_field else ""


async def _start_simulated(config: simulated.SimulatedEngineConfig, parts: EngineParts) -> Engine:
    await asyncio.sleep(config.load_s / config.time_scale)
    return simulated.SimulatedEngine(config, kv_store=parts.kv_store, kv_receiver=parts.kv_receiver)


async def _start_vllm(config: vllm_engine.VllmEngineConfig, parts: EngineParts) -> Engine:
    # Engine start blocks for a while: off the event loop, so leases keep being renewed meanwhile.
    return await asyncio.to_thread(vllm_engine.VllmEngine, config, kv_store=parts.kv_store,
                                   kv_receiver=parts.kv_receiver, loop=asyncio.get_running_loop())


SIMULATED = EngineKind(
    name="simulated", summary="a cost model in place of a GPU (tests, benchmarks, planning)",
    config=simulated.SimulatedEngineConfig, start=_start_simulated, served_name_field="model",
    kv_layout_args=("block_size", "kv_bytes_per_token", "num_layers"), plan_args=simulated.planned_args,
    tokenize_text=simulated.tokenize)
VLLM = EngineKind(
    name="vllm", summary="vLLM (the tiny local model unless --model-path is given)",
    config=vllm_engine.VllmEngineConfig, start=_start_vllm, served_name_field="served_model_name",
    kv_layout_args=("dtype", "block_size"), plan_args=vllm_engine.planned_args, model_path_field="model_path",
    cpus_field="cpus",
    passthrough=Passthrough(flag="vllm-arg", field="extra_args", check=vllm_engine.extra_engine_args,
                            help="any other vLLM engine argument, e.g. --vllm-arg kv_cache_dtype=fp8 "
                            "(repeatable; VALUE is read as YAML)"))

ENGINES: dict[str, EngineKind] = {kind.name: kind for kind in (VLLM, SIMULATED)}
DEFAULT_ENGINE = VLLM.name


def engine_kind(name: str) -> EngineKind:
    """The engine called `name`; an unknown name is refused with the known ones."""
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {name!r}") from None


def kind_of(config: object) -> EngineKind:
    """The engine a config dataclass belongs to."""
    for kind in ENGINES.values():
        if isinstance(config, kind.config):
            return kind
    raise ValueError(f"not an engine config: {type(config).__name__}")
