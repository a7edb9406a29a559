"""Hand-encoded KV chunks are byte-compatible with protobuf's PullKvResponse, both ways."""

from __future__ import annotations

import pytest

from dynamo_grpc.kv.wire import encode_chunk, parse_chunk
from dynamo_grpc.v1 import kv_transfer_pb2 as kv_pb

CASES = [(0, b""), (0, b"kv"), (1 << 20, bytes(range(256)) * 4), (2**64 - 1, b"\x00" * 300)]


@pytest.mark.parametrize(("offset", "data"), CASES)
def test_round_trips_through_protobuf(offset: int, data: bytes) -> None:
    parsed = kv_pb.PullKvResponse.FromString(encode_chunk((offset, memoryview(data))))
    assert (parsed.offset, parsed.data) == (offset, data)
    got_offset, got_data = parse_chunk(kv_pb.PullKvResponse(offset=offset, data=data).SerializeToString())
    assert (got_offset, bytes(got_data)) == (offset, data)


def test_unknown_fields_are_skipped_and_truncation_is_an_error() -> None:
    message = kv_pb.PullKvResponse(offset=7, data=b"abc").SerializeToString()
    # Field 9 (varint) and field 10 (length-delimited), as a newer server might add.
    extended = message + bytes([9 << 3 | 0, 5, 10 << 3 | 2, 2]) + b"zz"
    offset, data = parse_chunk(extended)
    assert (offset, bytes(data)) == (7, b"abc")
    for cut in (1, 3, len(message) - 1):
        with pytest.raises(ValueError):
            parse_chunk(message[:cut])
