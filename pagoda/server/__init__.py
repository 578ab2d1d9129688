"""HTTP: the OpenAI-compatible server (knows nothing about tensors)."""
