from dynamo_grpc.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodeStart(_message.Message):
    __slots__ = ("params", "kv_handle", "prefill_worker_id", "resume_token_ids", "last_tokens_in_completion", "kv_transports")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    KV_HANDLE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LAST_TOKENS_IN_COMPLETION_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    params: _common_pb2.GenerationParams
    kv_handle: _common_pb2.KvHandle
    prefill_worker_id: str
    resume_token_ids: _containers.RepeatedScalarFieldContainer[int]
    last_tokens_in_completion: bool
    kv_transports: _containers.RepeatedScalarFieldContainer[_common_pb2.KvTransport]
    def __init__(self, params: _Optional[_Union[_common_pb2.GenerationParams, _Mapping]] = ..., kv_handle: _Optional[_Union[_common_pb2.KvHandle, _Mapping]] = ..., prefill_worker_id: _Optional[str] = ..., resume_token_ids: _Optional[_Iterable[int]] = ..., last_tokens_in_completion: _Optional[bool] = ..., kv_transports: _Optional[_Iterable[_Union[_common_pb2.KvTransport, str]]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "start", "cancel")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    start: DecodeStart
    cancel: _common_pb2.CancelAction
    def __init__(self, request_id: _Optional[str] = ..., start: _Optional[_Union[DecodeStart, _Mapping]] = ..., cancel: _Optional[_Union[_common_pb2.CancelAction, _Mapping]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("request_id", "tokens", "completion")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tokens: _common_pb2.TokenBatch
    completion: _common_pb2.Completion
    def __init__(self, request_id: _Optional[str] = ..., tokens: _Optional[_Union[_common_pb2.TokenBatch, _Mapping]] = ..., completion: _Optional[_Union[_common_pb2.Completion, _Mapping]] = ...) -> None: ...

class GetDecodeStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetDecodeStatsResponse(_message.Message):
    __slots__ = ("stats",)
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: _common_pb2.WorkerStats
    def __init__(self, stats: _Optional[_Union[_common_pb2.WorkerStats, _Mapping]] = ...) -> None: ...
