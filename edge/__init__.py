"""The REST edge: a thin FastAPI bridge from OpenAI, llama.cpp (LLM for Unity) and Automatic1111 JSON to the
broker's gRPC API. It speaks only gRPC to the broker and forwards the caller's credentials."""
