from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class PullKvRequest(_message.Message):
    __slots__ = ("request_id", "transfer_id", "pull_token", "engine_fingerprint", "offset", "length", "release")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    PULL_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transfer_id: str
    pull_token: str
    engine_fingerprint: str
    offset: int
    length: int
    release: bool
    def __init__(self, request_id: _Optional[str] = ..., transfer_id: _Optional[str] = ..., pull_token: _Optional[str] = ..., engine_fingerprint: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., release: _Optional[bool] = ...) -> None: ...

class PullKvResponse(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ReleaseKvRequest(_message.Message):
    __slots__ = ("request_id", "transfer_id", "pull_token", "require_held")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    PULL_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_HELD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transfer_id: str
    pull_token: str
    require_held: bool
    def __init__(self, request_id: _Optional[str] = ..., transfer_id: _Optional[str] = ..., pull_token: _Optional[str] = ..., require_held: _Optional[bool] = ...) -> None: ...

class ReleaseKvResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
