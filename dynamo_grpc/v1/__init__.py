"""Generated protobuf and gRPC stubs for package dynamo_grpc.v1 (see scripts/gen_protos.py)."""
