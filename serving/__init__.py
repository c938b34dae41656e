"""Serving: an embedded continuous-batching engine and an OpenAI-compatible HTTP server.

* :mod:`.engine` — :class:`Engine` (background thread, async API) over :mod:`.core` (one step of
  continuous batching), :mod:`.kv_batch` (the left-padded batch KV cache), :mod:`.sampling`,
  :mod:`.detok` (streaming text with stop strings);
* :mod:`.server` — ``create_app(engine, tokenizer, model_name)`` (FastAPI; needs the ``serve`` extra),
  :mod:`.protocol` (request bodies, OpenAI error shape), :mod:`.metrics` (Prometheus);
* :mod:`.cli` — ``llmquant serve``; :mod:`.launch` — uvicorn in a thread (tests, benchmarks).

Nothing is imported here: ``llmquant.serving.vllm`` (a vLLM plugin, loaded inside vLLM's own
environment) must not pull in the embedded engine. Import from the submodules.
"""
