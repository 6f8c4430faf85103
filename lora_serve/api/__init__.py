"""OpenAI-compatible HTTP API: translates requests and responses to and from the engine."""
