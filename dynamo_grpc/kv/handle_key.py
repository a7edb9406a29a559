"""The deployment's KV key: prefill workers sign the KV handles they hand out, decode workers check them.

A handle names where a decode worker connects (endpoint, host, segment, NIXL agent) and how much memory it
allocates (total_bytes). Anyone who can call DecodeService could otherwise make a decode worker connect to
any address and allocate any size. With a key, a prefill worker puts an HMAC-SHA256 over those fields and
the lease expiry in `KvHandle.mac`; a decode worker with the same key refuses a handle whose MAC is missing
or wrong, or whose lease has ended, before it allocates or connects. One HMAC per handle, over a few hundred
bytes (plus NIXL's agent metadata where it is offered).

The key comes from `--kv-key-file` (a file of at least 32 bytes; hex text or raw bytes) or the environment
variable `DYNAMO_GRPC_KV_KEY` (hex); `serve` and `up` make one for the workers they start when none is given.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
import time
from pathlib import Path

from dynamo_grpc.errors import NotFound, PermissionDenied
from dynamo_grpc.v1 import common_pb2 as pb

KEY_ENV = "DYNAMO_GRPC_KV_KEY"
"""The key as hex, for processes a deployment starts (`--kv-key-file` wins over it)."""
MIN_KEY_BYTES = 32
CLOCK_SKEW_S = 2.0
"""How far a decode worker's clock may run ahead of the prefill worker's before a live lease reads as ended."""
_DOMAIN = b"dynamo-grpc/kv-handle/v1\0"


class KvKey:
    """A deployment's secret for KV handles; `repr` never shows it."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_KEY_BYTES:
            raise ValueError(f"a KV key needs at least {MIN_KEY_BYTES} bytes, got {len(secret)}")
        self._secret = secret

    def __repr__(self) -> str:
        return "KvKey(…)"

    @classmethod
    def generate(cls) -> KvKey:
        return cls(secrets.token_bytes(MIN_KEY_BYTES))

    @classmethod
    def from_hex(cls, text: str) -> KvKey:
        try:
            return cls(bytes.fromhex(text.strip()))
        except ValueError as error:
            raise ValueError(f"a KV key is hex of at least {MIN_KEY_BYTES} bytes: {error}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> KvKey:
        """Hex text (as `generate().hex()` writes) or, failing that, the file's raw bytes."""
        data = Path(path).read_bytes()
        try:
            return cls.from_hex(data.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return cls(data)

    def hex(self) -> str:
        return self._secret.hex()

    def sign(self, handle: pb.KvHandle) -> None:
        handle.mac = self._mac(handle)

    def verify(self, handle: pb.KvHandle, *, request_id: str, now_s: float | None = None) -> None:
        """Refuse a handle this deployment's prefill workers did not hand out as it is, or whose lease
        ended (by this host's clock, less `CLOCK_SKEW_S`)."""
        if not handle.mac:
            raise PermissionDenied("kv_handle carries no MAC and this decode worker takes only handles signed "
                                   "with the deployment's KV key; send the handle a prefill worker of this "
                                   "deployment returned", request_id=request_id, reason="KV_HANDLE_UNSIGNED")
        if not hmac.compare_digest(handle.mac, self._mac(handle)):
            raise PermissionDenied("kv_handle's MAC does not match: it was changed, or signed with another "
                                   "deployment's KV key; send the handle exactly as the prefill worker returned "
                                   "it", request_id=request_id, reason="BAD_KV_HANDLE_MAC")
        now = time.time() if now_s is None else now_s
        expires = handle.lease_expires_at.ToNanoseconds() / 1e9
        if now > expires + CLOCK_SKEW_S:
            raise NotFound(f"KV transfer {handle.transfer_id} expired {now - expires:.1f} s ago; prefill again",
                           request_id=request_id, reason="KV_HANDLE_EXPIRED")

    def _mac(self, handle: pb.KvHandle) -> bytes:
        mac = hmac.new(self._secret, _DOMAIN, hashlib.sha256)
        for text in (handle.transfer_id, handle.endpoint, handle.pull_token, handle.engine_fingerprint,
                     handle.host, handle.shm_segment, handle.layout.dtype):
            _add_bytes(mac, text.encode())
        _add_bytes(mac, handle.prompt_digest)
        layout = handle.layout
        mac.update(struct.pack("<QQIIqiIIII", handle.total_bytes, layout.bytes_per_token, handle.num_tokens,
                               handle.crc32, handle.lease_expires_at.seconds, handle.lease_expires_at.nanos,
                               layout.block_size, layout.num_blocks, layout.num_layers, handle.HasField("nixl")))
        if handle.HasField("nixl"):
            nixl = handle.nixl
            _add_bytes(mac, nixl.agent_metadata)
            mac.update(struct.pack("<QII", nixl.address, nixl.device_id, nixl.memory_kind))
        mac.update(struct.pack("<Q", len(handle.shards)))
        for shard in handle.shards:
            mac.update(struct.pack("<IIIQQI", shard.rank, shard.first_kv_head, shard.num_kv_heads, shard.offset,
                                   shard.size, shard.crc32))
        return mac.digest()


def _add_bytes(mac: hmac.HMAC, data: bytes) -> None:
    """Length first, so no two different field lists make the same message."""
    mac.update(struct.pack("<Q", len(data)))
    mac.update(data)


def load_kv_key(path: str = "") -> KvKey | None:
    """The key from `path`, else from `DYNAMO_GRPC_KV_KEY`, else None (handles go unsigned and unchecked)."""
    if path:
        return KvKey.from_file(path)
    text = os.environ.get(KEY_ENV, "")
    return KvKey.from_hex(text) if text else None
