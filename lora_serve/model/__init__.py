"""Base model: loading (embedded default or HF directory) and a compact Llama-family implementation."""
