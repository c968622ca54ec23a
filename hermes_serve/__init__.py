"""hermes-serve: a shared, OpenAI-compatible LLM service (BentoML + vLLM in-process)."""
