"""A protoc plugin for `buf generate`: Python messages, type stubs and gRPC stubs from grpc_tools' protoc.

buf hands plugins descriptors with every field's json_name filled in; protoc leaves it out of the
descriptors it embeds. Dropping it here makes buf's Python output byte for byte what
scripts/gen_protos.py writes, so either command can regenerate the committed stubs.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc


def drop_json_names(messages: list[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        drop_json_names(list(message.nested_type))


def generate(request: plugin_pb2.CodeGeneratorRequest) -> plugin_pb2.CodeGeneratorResponse:
    files = descriptor_pb2.FileDescriptorSet(file=request.proto_file)
    for file in files.file:
        drop_json_names(list(file.message_type))
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        descriptors = Path(tmp) / "descriptors.pb"
        descriptors.write_bytes(files.SerializeToString())
        args = ["protoc", f"--descriptor_set_in={descriptors}", f"--python_out={out}", f"--pyi_out={out}",
                f"--grpc_python_out={out}", *request.file_to_generate]
        if protoc.main(args) != 0:
            response.error = "grpc_tools' protoc failed (its message is above)"
            return response
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            response.file.add(name=str(path.relative_to(out)), content=path.read_text())
    return response


def main() -> int:
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    sys.stdout.buffer.write(generate(request).SerializeToString())
    return 0


if __name__ == "__main__":
    sys.exit(main())
