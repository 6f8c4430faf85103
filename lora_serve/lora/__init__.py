"""LoRA adapters: PEFT format parsing, weights, the two-tier cache and the mixed-adapter matmul ops (ops/)."""
