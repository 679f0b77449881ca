"""Generated protobuf/gRPC stubs (from proto/pdrouter_proto/*.proto; regenerate with `make proto`)."""
