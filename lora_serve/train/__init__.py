"""`lora-serve train`: LoRA fine-tuning of a base model on a JSONL file of chat examples.

config.py   what to train (TrainConfig: rank, targets, optimiser, output)
data.py     JSONL -> chat messages -> token ids with labels only on the assistant's tokens
trainer.py  PEFT LoRA on transformers' model, a plain AdamW loop, save as a PEFT folder
upload.py   POST the saved folder to a running server's /v1/adapters
command.py  the CLI subcommand
"""
