"""One exception hierarchy and one exception -> gRPC status table for the whole project.

Every error leaves a server as a canonical status code plus `google.rpc.ErrorInfo` (AIP-193): `reason`
in UPPER_SNAKE, our domain, and the request id in `metadata`, so clients can branch on `reason`
instead of parsing messages.
"""

from __future__ import annotations

import re

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "dynamo-grpc"
# gRPC's own refusal of a message over a channel's size limit: "CLIENT: Sent message larger than max (N vs. M)".
_MESSAGE_SIZE_REFUSAL = re.compile(r"message larger than max \((\d+) vs\. (\d+)\)")

# Status text travels in trailers twice (grpc-message, and the details' ErrorInfo): bounded, both fit well
# within gRPC's 8 KiB metadata default, whatever a client sent (an id or model name of megabytes).
MAX_ID_IN_STATUS = 256
MAX_MESSAGE_IN_STATUS = 1000


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


class DynamoError(Exception):
    """An error a client can act on; `message` is shown to users, so it carries no internals."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, request_id: str = "", reason: str | None = None,
                 code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        if reason is not None:
            self.reason = reason
        if code is not None:
            self.code = code

    def to_status(self) -> grpc.Status:
        """The status, its text bounded so it always fits gRPC's metadata limit (it travels in trailers)."""
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN)
        if self.request_id:
            info.metadata["request_id"] = _bounded(self.request_id, MAX_ID_IN_STATUS)
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(code=self.code.value[0], message=_bounded(self.message, MAX_MESSAGE_IN_STATUS),
                                   details=[detail])
        return rpc_status.to_status(status)


class InvalidArgument(DynamoError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class NotFound(DynamoError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(DynamoError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "REQUEST_ID_IN_USE"


class PermissionDenied(DynamoError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Unauthenticated(DynamoError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class FailedPrecondition(DynamoError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class ResourceExhausted(DynamoError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class Unavailable(DynamoError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class DeadlineExceeded(DynamoError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


def from_rpc_error(error: grpc.aio.AioRpcError, *, request_id: str = "") -> DynamoError:
    """Turn a downstream call's failure into our error, keeping its code and reason for the caller."""
    reason = error.code().name
    status = rpc_status.from_call(error)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
    too_large = _MESSAGE_SIZE_REFUSAL.search(error.details() or "") if reason == "RESOURCE_EXHAUSTED" else None
    if too_large:  # gRPC's own refusal carries no ErrorInfo: name it, and say the limit
        return message_too_large(int(too_large[1]), int(too_large[2]), request_id=request_id)
    return DynamoError(error.details() or reason, request_id=request_id, reason=reason, code=error.code())


def message_too_large(size: int, limit: int, *, request_id: str = "") -> ResourceExhausted:
    return ResourceExhausted(f"the request makes a gRPC message of {size} bytes, over the {limit / 2**20:g} MiB "
                             "message limit; shorten the prompt", request_id=request_id, reason="MESSAGE_TOO_LARGE")


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a failed call (the status code name when it carries none)."""
    return from_rpc_error(error).reason


def describe(error: grpc.aio.AioRpcError) -> str:
    """A failed call in one line for people: `REASON: message`."""
    failure = from_rpc_error(error)
    return f"{failure.reason}: {failure.message}"
