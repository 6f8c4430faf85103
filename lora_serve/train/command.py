"""`lora-serve train DATA.jsonl [options]`: fine-tune a LoRA adapter, optionally upload it (heavy imports in cli_cmd).

    lora-serve train adapters/pirate/train.jsonl --output-dir adapters/pirate
    lora-serve train chats.jsonl --model ./Llama-3.2-1B-Instruct --r 16 --target-modules all-linear \
        --max-steps 500 --output-dir out/support --upload http://127.0.0.1:8000 --api-key sk-admin
"""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import CliPositionalArg

from .config import TrainConfig


class TrainCommand(TrainConfig):
    """Fine-tune a LoRA adapter on a JSONL file of chat examples ({"messages": [...]}) or prompt/completion
    pairs; the loss is on the assistant's tokens only. Writes a PEFT adapter folder."""

    data: CliPositionalArg[Path]
    """JSONL training file: {"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ..., "completion": ...} per line."""

    upload: str | None = None
    """Server to upload the adapter to when training ends, e.g. http://127.0.0.1:8000 (POST /v1/adapters)."""

    name: str | None = None
    """Adapter name for --upload (default: the output folder's name)."""

    api_key: str | None = None
    """Bearer key for --upload (the server's --admin-api-key, or --api-key when it has no admin key)."""

    def cli_cmd(self) -> None:
        from .trainer import train
        from .upload import upload_adapter

        result = train(TrainConfig(**self.model_dump(include=set(TrainConfig.model_fields))), self.data)
        first, last = result.losses[0], sum(result.losses[-10:]) / len(result.losses[-10:])
        print(
            f"trained {result.num_trainable:,} LoRA parameters on {result.num_examples} examples, "
            f"{len(result.losses)} steps: loss {first:.4f} -> {last:.4f} (mean of the last 10 steps); "
            f"saved to {result.output_dir}"
        )
        if self.upload:
            name = self.name or Path(result.output_dir).resolve().name
            reply = upload_adapter(self.upload, name, result.output_dir, self.api_key)
            print(f"uploaded as {reply.get('id', name)!r} to {self.upload}")
