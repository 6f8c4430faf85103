"""Ways to run lora-serve beyond one process; see deploy/README.md."""
