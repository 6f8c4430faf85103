"""The inference engine: scheduler, KV cache, model runner, sampler. Knows nothing of HTTP."""
