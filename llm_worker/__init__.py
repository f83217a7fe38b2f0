"""The text worker: `velesio.v1.TextWorker` around an engine (llama.cpp, or `echo` for tests)."""
