"""A worker process: the gRPC Worker service over an engine (real torch or mock)."""
