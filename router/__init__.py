"""The front door: HTTP + gRPC servers, tokenizer, KV index, routing, orchestration."""
