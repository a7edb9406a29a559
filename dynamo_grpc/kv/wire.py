"""`PullKvResponse` on the wire without protobuf objects, because KV chunks are most of the bytes we move.

Building a message copies a chunk in, serializing copies it again, and reading `.data` on the other
side copies it out once more. Encoding and parsing the two fields by hand leaves one copy each way.
The bytes are exactly PullKvResponse's (offset: field 1 varint, data: field 2 bytes), so clients
generated from the proto in any language read them as usual.
"""

from __future__ import annotations

import grpc

from dynamo_grpc.v1 import kv_transfer_pb2 as kv_pb

SERVICE = kv_pb.DESCRIPTOR.services_by_name["KvTransferService"].full_name
PULL_KV_METHOD = f"/{SERVICE}/PullKv"
_OFFSET_KEY = bytes([1 << 3 | 0])
_DATA_KEY = bytes([2 << 3 | 2])


def encode_chunk(chunk: tuple[int, memoryview]) -> bytes:
    """(offset, data) as a serialized `PullKvResponse`."""
    offset, data = chunk
    return b"".join((_OFFSET_KEY, _varint(offset), _DATA_KEY, _varint(len(data)), data))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def parse_chunk(message: bytes) -> tuple[int, memoryview]:
    """A serialized `PullKvResponse` as (offset, data), data a view into `message`; unknown fields are skipped."""
    view = memoryview(message)
    offset, data = 0, view[0:0]
    pos, size = 0, len(view)
    while pos < size:
        key, pos = _read_varint(view, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(view, pos)
            if field == 1:
                offset = value
        elif wire_type == 2:
            length, pos = _read_varint(view, pos)
            if pos + length > size:
                raise ValueError("truncated PullKvResponse")
            if field == 2:
                data = view[pos:pos + length]
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"PullKvResponse field {field} has unsupported wire type {wire_type}")
    if pos != size:
        raise ValueError("truncated PullKvResponse")
    return offset, data


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise ValueError("malformed varint in PullKvResponse")
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7


def add_kv_transfer_service(servicer: object, server: grpc.aio.Server) -> None:
    """Like the generated `add_KvTransferServiceServicer_to_server`, with PullKv chunks encoded by hand:
    the servicer's PullKv yields (offset, data) pairs."""
    handlers = {
        "PullKv": grpc.unary_stream_rpc_method_handler(
            servicer.PullKv, request_deserializer=kv_pb.PullKvRequest.FromString,  # type: ignore[attr-defined]
            response_serializer=encode_chunk),
        "ReleaseKv": grpc.unary_unary_rpc_method_handler(
            servicer.ReleaseKv, request_deserializer=kv_pb.ReleaseKvRequest.FromString,  # type: ignore[attr-defined]
            response_serializer=kv_pb.ReleaseKvResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
