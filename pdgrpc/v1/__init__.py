"""Generated protobuf and gRPC code for pdgrpc.v1."""
