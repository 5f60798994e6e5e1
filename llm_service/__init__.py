"""The LLM tier: engine, models, layers, gRPC server and client."""
