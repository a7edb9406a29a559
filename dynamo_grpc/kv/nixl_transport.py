"""NIXL: a decode worker READs a transfer's bytes straight out of memory the prefill worker registered.

One agent per worker process (`NixlAgent`). The prefill worker's store registers every transfer it holds
and puts its agent's partial metadata (the agent's name, how to connect to it, this memory's registration)
in the handle's `NixlSource`, so the metadata travels with the handle over gRPC and nothing else is
needed. The decode worker loads it into its own agent, registers the destination (the new segment its
engine reads), READs, and then releases the transfer over gRPC: the release succeeding proves the lease
held for the whole read. UCX picks the wire: RDMA where a NIC offers it, else shared memory on one host,
else TCP; `UCX_TLS` narrows the choice.

Host memory (DRAM: shared-memory segments, bytes) is what runs here. Device memory (VRAM, a CUDA tensor)
registers through the same calls, but that path has not run: this machine has no GPU.

NIXL is optional (`pip install 'dynamo-grpc[nixl]'`); without it workers offer shm and gRPC only.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import sys
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from dynamo_grpc.v1 import common_pb2 as pb

log = logging.getLogger(__name__)

_POLL_START_S = 50e-6
_POLL_MAX_S = 2e-3
_MEMORY_TYPES = {pb.NIXL_MEMORY_KIND_DRAM: "DRAM", pb.NIXL_MEMORY_KIND_VRAM: "VRAM"}
_LOADS_BEFORE_FORGETTING = 1024
_PROGRESS_WAKEUP_US = 1000
DEFAULT_NIXL_MIN_BYTES = 1 << 20
"""Smaller transfers are not offered over NIXL: registering memory on both sides, loading the source's
metadata, polling the READ and releasing the lease over gRPC cost more than one gRPC pull of the bytes.
The simulated engine's disaggregated requests (~40 KiB of KV each) took 2.96 ms of decode-worker CPU over
gRPC against 4.15 ms over NIXL (bench/stack_overhead.py, one run)."""


def nixl_installed() -> bool:
    return importlib.util.find_spec("nixl") is not None


class NixlFailure(Exception):
    """A NIXL call or transfer failed (the peer is gone, the memory is no longer registered, ...)."""


@dataclass
class Registration:
    """Memory registered with an agent; `owner` keeps the buffer alive while it is registered."""

    address: int
    nbytes: int
    device_id: int
    memory_kind: int
    descs: Any
    owner: Any


def _load_nixl() -> Any:
    """The nixl package, its logs on stderr at WARN and UCX's at ERROR unless NIXL_LOG_LEVEL and UCX_LOG_LEVEL
    say otherwise: nixl logs each agent's start at INFO and UCX its warnings on stdout, where `serve --prompt`
    writes only the answer."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    os.environ.setdefault("UCX_LOG_LEVEL", "error")
    from nixl import _api

    for handler in logging.getLogger("nixl").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    return _api


def _failures() -> tuple[type[Exception], ...]:
    """The exceptions nixl's bindings raise (each derives from Exception directly)."""
    from nixl import _bindings

    return tuple(getattr(_bindings, name) for name in dir(_bindings)
                 if name.startswith("nixl") and name.endswith("Error"))


def _paced(config_class: type) -> type:
    """nixl's Python API builds its agent config with no delay between the UCX progress thread's polls, so
    an idle agent spins a core (a third of one per worker here, measured). With a delay the thread sleeps in
    poll() until UCX signals work, waking at least every millisecond; transfers still run at full rate,
    since UCX wakes it (bench/kv_transfer.py)."""

    class PacedAgentConfig(config_class):  # type: ignore[misc, valid-type]
        def __setattr__(self, name: str, value: Any) -> None:
            super().__setattr__(name, max(value, _PROGRESS_WAKEUP_US) if name == "pthrDelay" else value)

    return PacedAgentConfig


def buffer_address(buffer: Any) -> tuple[int, int, int, int]:
    """(address, bytes, device id, memory kind) of a buffer: anything with the buffer protocol (host memory,
    read-only is fine) or a torch tensor, on the host or a GPU (not run here)."""
    if hasattr(buffer, "data_ptr"):  # a torch tensor
        device = buffer.get_device()
        kind = pb.NIXL_MEMORY_KIND_DRAM if device < 0 else pb.NIXL_MEMORY_KIND_VRAM
        return buffer.data_ptr(), buffer.numel() * buffer.element_size(), max(device, 0), kind
    array = np.frombuffer(buffer, dtype=np.uint8)  # dropped at once: an mmap with views cannot be closed
    return array.ctypes.data, array.nbytes, 0, pb.NIXL_MEMORY_KIND_DRAM


class NixlAgent:
    """This process's NIXL agent (UCX backend, with its own progress thread)."""

    def __init__(self, name: str = "") -> None:
        api = _load_nixl()
        self.name = name or f"dynamo-grpc-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        config = api.nixl_agent_config(backends=["UCX"],
                                       sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        plain_config = api.nixlBind.nixlAgentConfig
        api.nixlBind.nixlAgentConfig = _paced(plain_config)
        try:
            self._agent = api.nixl_agent(self.name, config)
        finally:
            api.nixlBind.nixlAgentConfig = plain_config
        self._failures = _failures()
        self._registered: dict[int, Registration] = {}
        self._loads: dict[str, int] = {}
        self._reading: dict[str, int] = {}

    @property
    def registrations(self) -> int:
        return len(self._registered)

    def register(self, buffer: Any) -> Registration:
        """Register a buffer for READs by other agents (or as the destination of our own)."""
        address, nbytes, device, kind = buffer_address(buffer)
        try:
            descs = self._agent.register_memory([(address, nbytes, device, "")], _MEMORY_TYPES[kind])
        except self._failures as error:
            raise NixlFailure(f"registering {nbytes} bytes failed: {_describe(error)}") from None
        registration = Registration(address, nbytes, device, kind, descs, buffer)
        self._registered[id(registration)] = registration
        return registration

    def deregister(self, registration: Registration) -> None:
        if self._registered.pop(id(registration), None) is None:
            return
        try:
            self._agent.deregister_memory(registration.descs)
        except self._failures as error:
            log.warning("NIXL: deregistering %d bytes failed: %s", registration.nbytes, _describe(error))

    def source(self, registration: Registration) -> pb.NixlSource:
        """What a remote agent needs to READ this registered memory."""
        metadata = self._agent.get_partial_agent_metadata(registration.descs, True)
        return pb.NixlSource(agent_metadata=metadata, address=registration.address,
                             device_id=registration.device_id, memory_kind=registration.memory_kind)

    async def read(self, source: pb.NixlSource, into: Registration) -> None:
        """READ `into.nbytes` bytes from a remote agent's registered memory into ours; raises
        `NixlFailure`."""
        memory_type = _MEMORY_TYPES.get(source.memory_kind)
        if memory_type is None:
            raise NixlFailure(f"unknown memory kind {source.memory_kind} in the handle's NIXL source")
        handle, remote = None, ""
        try:
            remote = self._load_remote(source.agent_metadata)
            local = self._agent.get_xfer_descs([(into.address, into.nbytes, into.device_id)],
                                               _MEMORY_TYPES[into.memory_kind])
            remote_descs = self._agent.get_xfer_descs([(source.address, into.nbytes, source.device_id)],
                                                      memory_type)
            handle = self._agent.initialize_xfer("READ", local, remote_descs, remote)
            state = self._agent.transfer(handle)
            delay = _POLL_START_S
            while state == "PROC":
                await asyncio.sleep(delay)
                delay = min(delay * 2, _POLL_MAX_S)
                state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise NixlFailure(f"the READ from agent {remote} ended in state {state}")
        except self._failures as error:
            raise NixlFailure(_describe(error)) from None
        finally:
            if handle is not None:
                self._release(handle)
            if remote:
                self._reading[remote] -= 1

    def _load_remote(self, metadata: bytes) -> str:
        """The remote agent's name, its metadata loaded. Each transfer's metadata adds one registration to
        what this agent keeps of the remote; forgetting an idle remote now and then keeps that bounded."""
        name = self._add_remote(metadata)
        self._loads[name] = self._loads.get(name, 0) + 1
        if self._loads[name] >= _LOADS_BEFORE_FORGETTING and not self._reading.get(name):
            self._agent.remove_remote_agent(name)
            self._loads[name] = 0
            name = self._add_remote(metadata)
        self._reading[name] = self._reading.get(name, 0) + 1
        return name

    def _add_remote(self, metadata: bytes) -> str:
        name = self._agent.add_remote_agent(metadata)
        return name.decode() if isinstance(name, bytes) else name

    def _release(self, handle: Any) -> None:
        try:
            handle.release()
        except self._failures as error:  # an aborted transfer may refuse; the agent frees it when it goes
            log.debug("NIXL: releasing a transfer handle: %s", _describe(error))

    def close(self) -> None:
        for registration in list(self._registered.values()):
            self.deregister(registration)


def _describe(error: Exception) -> str:
    return f"{type(error).__name__.removeprefix('nixl')}: {error}" if str(error) else type(error).__name__
