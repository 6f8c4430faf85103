"""lora-serve: one resident base LLM, many LoRA adapters served at once."""

__version__ = "0.1.0"
