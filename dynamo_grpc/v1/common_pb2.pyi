import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ROLE_UNSPECIFIED: _ClassVar[WorkerRole]
    WORKER_ROLE_PREFILL: _ClassVar[WorkerRole]
    WORKER_ROLE_DECODE: _ClassVar[WorkerRole]
    WORKER_ROLE_ROUTER: _ClassVar[WorkerRole]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]

class KvTransport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_TRANSPORT_UNSPECIFIED: _ClassVar[KvTransport]
    KV_TRANSPORT_SHM: _ClassVar[KvTransport]
    KV_TRANSPORT_NIXL: _ClassVar[KvTransport]
    KV_TRANSPORT_GRPC: _ClassVar[KvTransport]

class NixlMemoryKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NIXL_MEMORY_KIND_UNSPECIFIED: _ClassVar[NixlMemoryKind]
    NIXL_MEMORY_KIND_DRAM: _ClassVar[NixlMemoryKind]
    NIXL_MEMORY_KIND_VRAM: _ClassVar[NixlMemoryKind]
WORKER_ROLE_UNSPECIFIED: WorkerRole
WORKER_ROLE_PREFILL: WorkerRole
WORKER_ROLE_DECODE: WorkerRole
WORKER_ROLE_ROUTER: WorkerRole
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason
KV_TRANSPORT_UNSPECIFIED: KvTransport
KV_TRANSPORT_SHM: KvTransport
KV_TRANSPORT_NIXL: KvTransport
KV_TRANSPORT_GRPC: KvTransport
NIXL_MEMORY_KIND_UNSPECIFIED: NixlMemoryKind
NIXL_MEMORY_KIND_DRAM: NixlMemoryKind
NIXL_MEMORY_KIND_VRAM: NixlMemoryKind

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos", "logprobs", "stop")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    logprobs: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerationParams(_message.Message):
    __slots__ = ("model", "prompt", "sampling", "deadline", "priority")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: Prompt
    sampling: SamplingParams
    deadline: _timestamp_pb2.Timestamp
    priority: int
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[_Union[Prompt, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., priority: _Optional[int] = ...) -> None: ...

class CancelAction(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "token", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., token: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("logprob", "token", "top_logprobs")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    token: str
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, logprob: _Optional[float] = ..., token: _Optional[str] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class TokenBatch(_message.Message):
    __slots__ = ("token_ids", "text", "logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cached_tokens", "kv_transferred_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFERRED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    kv_transferred_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., kv_transferred_tokens: _Optional[int] = ...) -> None: ...

class KvTransferStats(_message.Message):
    __slots__ = ("bytes", "duration_us", "path", "fallbacks", "shards")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    DURATION_US_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    duration_us: int
    path: str
    fallbacks: _containers.RepeatedScalarFieldContainer[str]
    shards: int
    def __init__(self, bytes: _Optional[int] = ..., duration_us: _Optional[int] = ..., path: _Optional[str] = ..., fallbacks: _Optional[_Iterable[str]] = ..., shards: _Optional[int] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("finish_reason", "usage", "kv_transfer", "prefill_worker_id", "decode_worker_id", "last_tokens")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DECODE_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    usage: Usage
    kv_transfer: KvTransferStats
    prefill_worker_id: str
    decode_worker_id: str
    last_tokens: TokenBatch
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., kv_transfer: _Optional[_Union[KvTransferStats, _Mapping]] = ..., prefill_worker_id: _Optional[str] = ..., decode_worker_id: _Optional[str] = ..., last_tokens: _Optional[_Union[TokenBatch, _Mapping]] = ...) -> None: ...

class KvLayout(_message.Message):
    __slots__ = ("block_size", "num_blocks", "bytes_per_token", "num_layers", "dtype")
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    block_size: int
    num_blocks: int
    bytes_per_token: int
    num_layers: int
    dtype: str
    def __init__(self, block_size: _Optional[int] = ..., num_blocks: _Optional[int] = ..., bytes_per_token: _Optional[int] = ..., num_layers: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class KvHandle(_message.Message):
    __slots__ = ("transfer_id", "endpoint", "pull_token", "num_tokens", "layout", "engine_fingerprint", "lease_expires_at", "total_bytes", "crc32", "host", "shm_segment", "nixl", "prompt_digest", "shards", "mac")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    PULL_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    SHM_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    NIXL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    endpoint: str
    pull_token: str
    num_tokens: int
    layout: KvLayout
    engine_fingerprint: str
    lease_expires_at: _timestamp_pb2.Timestamp
    total_bytes: int
    crc32: int
    host: str
    shm_segment: str
    nixl: NixlSource
    prompt_digest: bytes
    shards: _containers.RepeatedCompositeFieldContainer[KvShard]
    mac: bytes
    def __init__(self, transfer_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., pull_token: _Optional[str] = ..., num_tokens: _Optional[int] = ..., layout: _Optional[_Union[KvLayout, _Mapping]] = ..., engine_fingerprint: _Optional[str] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., total_bytes: _Optional[int] = ..., crc32: _Optional[int] = ..., host: _Optional[str] = ..., shm_segment: _Optional[str] = ..., nixl: _Optional[_Union[NixlSource, _Mapping]] = ..., prompt_digest: _Optional[bytes] = ..., shards: _Optional[_Iterable[_Union[KvShard, _Mapping]]] = ..., mac: _Optional[bytes] = ...) -> None: ...

class KvShard(_message.Message):
    __slots__ = ("rank", "first_kv_head", "num_kv_heads", "offset", "size", "crc32")
    RANK_FIELD_NUMBER: _ClassVar[int]
    FIRST_KV_HEAD_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    rank: int
    first_kv_head: int
    num_kv_heads: int
    offset: int
    size: int
    crc32: int
    def __init__(self, rank: _Optional[int] = ..., first_kv_head: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ..., crc32: _Optional[int] = ...) -> None: ...

class NixlSource(_message.Message):
    __slots__ = ("agent_metadata", "address", "device_id", "memory_kind")
    AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_KIND_FIELD_NUMBER: _ClassVar[int]
    agent_metadata: bytes
    address: int
    device_id: int
    memory_kind: NixlMemoryKind
    def __init__(self, agent_metadata: _Optional[bytes] = ..., address: _Optional[int] = ..., device_id: _Optional[int] = ..., memory_kind: _Optional[_Union[NixlMemoryKind, str]] = ...) -> None: ...

class WorkerCapacity(_message.Message):
    __slots__ = ("kv_blocks", "block_size", "max_batch_size")
    KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    kv_blocks: int
    block_size: int
    max_batch_size: int
    def __init__(self, kv_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., max_batch_size: _Optional[int] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "role", "model", "endpoint", "host", "engine_fingerprint", "capacity", "started_at", "engine", "kv_transports")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: WorkerRole
    model: str
    endpoint: str
    host: str
    engine_fingerprint: str
    capacity: WorkerCapacity
    started_at: _timestamp_pb2.Timestamp
    engine: str
    kv_transports: _containers.RepeatedScalarFieldContainer[KvTransport]
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., model: _Optional[str] = ..., endpoint: _Optional[str] = ..., host: _Optional[str] = ..., engine_fingerprint: _Optional[str] = ..., capacity: _Optional[_Union[WorkerCapacity, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., engine: _Optional[str] = ..., kv_transports: _Optional[_Iterable[_Union[KvTransport, str]]] = ...) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("active_requests", "used_kv_blocks", "total_kv_blocks", "held_transfers", "held_kv_bytes", "transfers_completed", "transfers_expired", "requests_finished", "prompt_tokens", "prefix_cache_hit_tokens", "ttft_p90_ms", "itl_p90_ms", "nixl_registrations")
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    USED_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HELD_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    HELD_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FINISHED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_P90_MS_FIELD_NUMBER: _ClassVar[int]
    ITL_P90_MS_FIELD_NUMBER: _ClassVar[int]
    NIXL_REGISTRATIONS_FIELD_NUMBER: _ClassVar[int]
    active_requests: int
    used_kv_blocks: int
    total_kv_blocks: int
    held_transfers: int
    held_kv_bytes: int
    transfers_completed: int
    transfers_expired: int
    requests_finished: int
    prompt_tokens: int
    prefix_cache_hit_tokens: int
    ttft_p90_ms: float
    itl_p90_ms: float
    nixl_registrations: int
    def __init__(self, active_requests: _Optional[int] = ..., used_kv_blocks: _Optional[int] = ..., total_kv_blocks: _Optional[int] = ..., held_transfers: _Optional[int] = ..., held_kv_bytes: _Optional[int] = ..., transfers_completed: _Optional[int] = ..., transfers_expired: _Optional[int] = ..., requests_finished: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., prefix_cache_hit_tokens: _Optional[int] = ..., ttft_p90_ms: _Optional[float] = ..., itl_p90_ms: _Optional[float] = ..., nixl_registrations: _Optional[int] = ...) -> None: ...
