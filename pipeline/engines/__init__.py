"""Model engines: the one OpenAI-protocol client, managed llama.cpp/vLLM servers, model files,
student loading and adapter export. Builds on `pipeline.core` only.

Kept import-free: `python -m pipeline.engines.llamacpp_server` imports this package first."""
