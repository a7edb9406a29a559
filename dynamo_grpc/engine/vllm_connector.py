"""Our vLLM KV connector: copies a request's KV blocks between vLLM's paged cache and shared memory.

vLLM loads it inside its engine-core process (`kv_connector_module_path`). All networking stays in
the worker's gRPC process, so the engine never waits on the network:

- prefill: when the prompt's last chunk has run, the request's blocks are copied into the shared-memory
  segment the adapter named; the worker's KV store then leases that segment to one decode worker, and
  vLLM frees its blocks at once;
- decode: before the forward pass that finishes the prompt, blocks are copied from a segment into the
  blocks vLLM allocated for the request. The worker made that segment its own: a second name for the
  prefill worker's segment on the same host (no copy), or a local one a gRPC pull filled. The last
  prompt token is always recomputed: its step samples the first output token.

Per request, `kv_transfer_params` says what to do:
    {"save_to": NAME}                     write the prompt's blocks to segment NAME
    {"load_from": NAME, "num_tokens": N}  read the KV of the first N prompt tokens from NAME
and the finished request's `kv_transfer_params` say what was done:
    {"saved_to": NAME, "num_tokens": N}   the prompt's blocks are in NAME
    {"loaded_tokens": N}                  the KV of N prompt tokens came from the segment

vLLM builds one scheduler-side instance per engine and one worker-side instance per tensor-parallel rank
(each in that rank's process); every rank copies its own shard, its KV heads, of each segment. Segments
hold whole blocks (see `kv_blocks`). Both sides agree on their layout because the router
pairs only engines with the same fingerprint (block size and layout included), and the decode adapter
checks it again before a pull.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from dynamo_grpc.engine.kv_blocks import Shard, block_major, load_blocks, save_blocks
from dynamo_grpc.engine.vllm_engine import CONNECTOR_NAME
from dynamo_grpc.kv import shm

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclass
class BlockCopy:
    """Copy a segment's blocks `first_segment_block`, +1, ... to or from the engine's blocks `block_ids`."""

    segment: str
    block_ids: list[int]
    first_segment_block: int = 0


@dataclass
class StepPlan(KVConnectorMetadata):
    """What the worker side copies in one engine step."""

    saves: list[BlockCopy] = field(default_factory=list)
    loads: list[BlockCopy] = field(default_factory=list)


class DynamoKvConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        # Scheduler side.
        self._local_hits: dict[str, int] = {}
        self._loads: dict[str, tuple[str, int, int]] = {}  # request -> (segment, first block, end block)
        self._loaded: dict[str, int] = {}  # request -> prompt tokens whose KV it loaded from a segment
        self._unsaved: dict[str, Request] = {}
        self._saved: dict[str, dict[str, Any]] = {}
        # Worker side.
        self._kv_caches: list[torch.Tensor] = []
        self._failed_blocks: set[int] = set()
        self._shard = Shard(_tp_rank(role), vllm_config.parallel_config.tensor_parallel_size)
        log.info("%s: %s side, tensor-parallel rank %d of %d, pid %d", CONNECTOR_NAME, role.name,
                 self._shard.rank, self._shard.num_ranks, os.getpid())

    # ---- scheduler side ----

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params or {}
        if "load_from" not in params or request.request_id in self._loaded:
            return 0, False  # a preempted request that already loaded recomputes: its segment is gone
        loadable = min(int(params["num_tokens"]), request.num_prompt_tokens) - 1
        self._local_hits[request.request_id] = num_computed_tokens
        return max(loadable - num_computed_tokens, 0), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        params = request.kv_transfer_params or {}
        rid = request.request_id
        if "save_to" in params:
            self._unsaved[rid] = request
        local = self._local_hits.pop(rid, 0)
        if num_external_tokens > 0:
            self._loaded[rid] = num_external_tokens
            self._loads[rid] = (params["load_from"], local // self._block_size,
                                math.ceil((local + num_external_tokens) / self._block_size))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._kv_cache_manager is not None
        plan = StepPlan()
        for rid, (segment, first, end) in self._loads.items():
            block_ids = self._kv_cache_manager.get_block_ids(rid)[0][first:end]
            plan.loads.append(BlockCopy(segment, block_ids, first))
        self._loads.clear()
        for rid, request in list(self._unsaved.items()):
            scheduled = scheduler_output.num_scheduled_tokens.get(rid, 0)
            if scheduled and request.num_computed_tokens + scheduled >= request.num_prompt_tokens:
                num_blocks = math.ceil(request.num_prompt_tokens / self._block_size)
                block_ids = self._kv_cache_manager.get_block_ids(rid)[0][:num_blocks]
                segment = request.kv_transfer_params["save_to"]
                plan.saves.append(BlockCopy(segment, block_ids))
                self._saved[rid] = {"saved_to": segment, "num_tokens": request.num_prompt_tokens}
                del self._unsaved[rid]
        return plan

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._unsaved.pop(rid, None)
        self._local_hits.pop(rid, None)
        self._loads.pop(rid, None)
        loaded = self._loaded.pop(rid, 0)
        # vLLM counts loaded tokens as cached; the adapter takes them out to report prefix-cache hits only.
        return False, self._saved.pop(rid, None) or ({"loaded_tokens": loaded} if loaded else None)

    # ---- worker side ----

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        num_blocks = self._kv_cache_config.num_blocks
        for name in sorted(kv_caches):
            try:
                self._kv_caches += block_major(kv_caches[name], num_blocks)
            except ValueError as error:
                raise RuntimeError(f"{CONNECTOR_NAME}: layer {name}: {error}") from None

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        plan = self._get_connector_metadata()
        assert isinstance(plan, StepPlan)
        for load in plan.loads:
            try:
                load_blocks(self._kv_caches, load.block_ids, load.segment, load.first_segment_block,
                            self._shard)
            except (OSError, ValueError, RuntimeError) as error:
                log.error("%s: loading KV from segment %s failed: %s", CONNECTOR_NAME, load.segment, error)
                self._failed_blocks.update(load.block_ids)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        plan = self._get_connector_metadata()
        assert isinstance(plan, StepPlan)
        for save in plan.saves:
            try:
                save_blocks(self._kv_caches, save.block_ids, save.segment, self._shard)
            except (OSError, ValueError, RuntimeError) as error:
                # The adapter sees no segment and fails the prefill with a clear error.
                log.error("%s: saving KV to segment %s failed: %s", CONNECTOR_NAME, save.segment, error)
                shm.unlink(save.segment)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed


def _tp_rank(role: KVConnectorRole) -> int:
    """This worker's tensor-parallel rank; the scheduler side, which serves every rank, counts as rank 0."""
    if role != KVConnectorRole.WORKER:
        return 0
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()
