from dynamo_grpc.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "params")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    params: _common_pb2.GenerationParams
    def __init__(self, request_id: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.GenerationParams, _Mapping]] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("request_id", "first_token_id", "kv_handle", "usage", "first_token_logprob")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    KV_HANDLE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_token_id: int
    kv_handle: _common_pb2.KvHandle
    usage: _common_pb2.Usage
    first_token_logprob: _common_pb2.TokenLogprob
    def __init__(self, request_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., kv_handle: _Optional[_Union[_common_pb2.KvHandle, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., first_token_logprob: _Optional[_Union[_common_pb2.TokenLogprob, _Mapping]] = ...) -> None: ...

class GetPrefillStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPrefillStatsResponse(_message.Message):
    __slots__ = ("stats",)
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: _common_pb2.WorkerStats
    def __init__(self, stats: _Optional[_Union[_common_pb2.WorkerStats, _Mapping]] = ...) -> None: ...
