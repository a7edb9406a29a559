import datetime

from dynamo_grpc.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PlannedWorker(_message.Message):
    __slots__ = ("name", "role", "host", "port", "devices", "engine_args")
    class EngineArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ARGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: _common_pb2.WorkerRole
    host: str
    port: int
    devices: _containers.RepeatedScalarFieldContainer[int]
    engine_args: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., host: _Optional[str] = ..., port: _Optional[int] = ..., devices: _Optional[_Iterable[int]] = ..., engine_args: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("model", "workers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    workers: _containers.RepeatedCompositeFieldContainer[PlannedWorker]
    def __init__(self, model: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[PlannedWorker, _Mapping]]] = ...) -> None: ...

class Pairing(_message.Message):
    __slots__ = ("prefill_worker_id", "decode_worker_id", "same_host", "kv_transports")
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DECODE_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SAME_HOST_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    prefill_worker_id: str
    decode_worker_id: str
    same_host: bool
    kv_transports: _containers.RepeatedScalarFieldContainer[_common_pb2.KvTransport]
    def __init__(self, prefill_worker_id: _Optional[str] = ..., decode_worker_id: _Optional[str] = ..., same_host: _Optional[bool] = ..., kv_transports: _Optional[_Iterable[_Union[_common_pb2.KvTransport, str]]] = ...) -> None: ...

class PairingGroup(_message.Message):
    __slots__ = ("model", "engine_fingerprint", "prefill_worker_ids", "decode_worker_ids", "kv_transports")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    engine_fingerprint: str
    prefill_worker_ids: _containers.RepeatedScalarFieldContainer[str]
    decode_worker_ids: _containers.RepeatedScalarFieldContainer[str]
    kv_transports: _containers.RepeatedScalarFieldContainer[_common_pb2.KvTransport]
    def __init__(self, model: _Optional[str] = ..., engine_fingerprint: _Optional[str] = ..., prefill_worker_ids: _Optional[_Iterable[str]] = ..., decode_worker_ids: _Optional[_Iterable[str]] = ..., kv_transports: _Optional[_Iterable[_Union[_common_pb2.KvTransport, str]]] = ...) -> None: ...

class PairingTable(_message.Message):
    __slots__ = ("pairings", "version", "groups")
    PAIRINGS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    pairings: _containers.RepeatedCompositeFieldContainer[Pairing]
    version: int
    groups: _containers.RepeatedCompositeFieldContainer[PairingGroup]
    def __init__(self, pairings: _Optional[_Iterable[_Union[Pairing, _Mapping]]] = ..., version: _Optional[int] = ..., groups: _Optional[_Iterable[_Union[PairingGroup, _Mapping]]] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ("role", "model")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    role: _common_pb2.WorkerRole
    model: str
    def __init__(self, role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., model: _Optional[str] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[_common_pb2.WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[_common_pb2.WorkerInfo, _Mapping]]] = ...) -> None: ...

class GetPlanRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPlanResponse(_message.Message):
    __slots__ = ("plan",)
    PLAN_FIELD_NUMBER: _ClassVar[int]
    plan: Plan
    def __init__(self, plan: _Optional[_Union[Plan, _Mapping]] = ...) -> None: ...

class GetPairingsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPairingsResponse(_message.Message):
    __slots__ = ("table",)
    TABLE_FIELD_NUMBER: _ClassVar[int]
    table: PairingTable
    def __init__(self, table: _Optional[_Union[PairingTable, _Mapping]] = ...) -> None: ...

class WatchPairingsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchPairingsResponse(_message.Message):
    __slots__ = ("table",)
    TABLE_FIELD_NUMBER: _ClassVar[int]
    table: PairingTable
    def __init__(self, table: _Optional[_Union[PairingTable, _Mapping]] = ...) -> None: ...

class ScaleTarget(_message.Message):
    __slots__ = ("prefill_workers", "decode_workers", "reason", "version", "changed_at")
    PREFILL_WORKERS_FIELD_NUMBER: _ClassVar[int]
    DECODE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_AT_FIELD_NUMBER: _ClassVar[int]
    prefill_workers: int
    decode_workers: int
    reason: str
    version: int
    changed_at: _timestamp_pb2.Timestamp
    def __init__(self, prefill_workers: _Optional[int] = ..., decode_workers: _Optional[int] = ..., reason: _Optional[str] = ..., version: _Optional[int] = ..., changed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CapacityDemand(_message.Message):
    __slots__ = ("model", "at")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    model: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, model: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetScaleTargetRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetScaleTargetResponse(_message.Message):
    __slots__ = ("target",)
    TARGET_FIELD_NUMBER: _ClassVar[int]
    target: ScaleTarget
    def __init__(self, target: _Optional[_Union[ScaleTarget, _Mapping]] = ...) -> None: ...
