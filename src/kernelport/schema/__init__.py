"""Protobuf schemas (.proto files, the descriptor set and its private pool) shared by config
reading and the gRPC front end; depends on nothing else in kernelport."""
