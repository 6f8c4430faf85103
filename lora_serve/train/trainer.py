"""LoRA fine-tuning: HF PEFT's LoRA layers on transformers' model, a plain AdamW loop, a PEFT folder out.

Every base weight is frozen; only lora_A [r, in] and lora_B [out, r] of the targeted
projections train. One step = one batch of `batch_size` examples, drawn from a shuffle
seeded by `seed`; the learning rate decays linearly from `learning_rate` to zero.
Training runs in float32 on the CPU (or the first CUDA device); the LoRA weights are cast
to `dtype` just before `save_pretrained`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..lora.lora_model import CONFIG_FILE
from ..model.default_model import DEFAULT_MODEL_NAME, resolve_model_path
from .config import TrainConfig
from .data import IGNORE_INDEX, Example, collate, encode, load_conversations

log = logging.getLogger(__name__)
SAVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class TrainResult:
    output_dir: Path
    losses: list[float]  # mean loss over the batch's assistant tokens, per step
    num_examples: int
    num_trainable: int  # LoRA parameters


def train(config: TrainConfig, data_path: Path) -> TrainResult:
    """Fine-tune, save the adapter to config.output_dir, and return the loss curve."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    model_path = resolve_model_path(config.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples = encode_all(tokenizer, load_conversations(Path(data_path)), config.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    torch.manual_seed(config.seed)  # PEFT draws lora_A's init from the global generator
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # PreTrainedModel.to is wrapped with functools.wraps(nn.Module.to), which mypy reads as unbound.
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)  # type: ignore[arg-type]
    model = add_lora(base, config)
    # adapter_config.json records the model as given, not the cache path of the embedded default.
    model.peft_config["default"].base_model_name_or_path = config.model or DEFAULT_MODEL_NAME
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    num_steps = config.max_steps or config.epochs * math.ceil(len(examples) / config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / num_steps)

    model.train()
    losses = []
    generator = torch.Generator().manual_seed(config.seed)
    with tqdm(total=num_steps, desc=f"Training {config.output_dir.name}", unit="step") as bar:
        for batch in _batches(examples, config.batch_size, num_steps, generator):
            inputs = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
            loss = assistant_loss(model, **inputs)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")  # running mean of the last 10

    save_adapter(model, config.output_dir, SAVE_DTYPES[config.dtype])
    return TrainResult(config.output_dir, losses, len(examples), sum(p.numel() for p in params))


def encode_all(tokenizer, conversations: list, max_length: int) -> list[Example]:
    examples = [e for c in conversations if (e := encode(tokenizer, c, max_length)) is not None]
    if len(examples) < len(conversations):
        log.warning("skipped %d examples with no assistant token within max_length=%d", len(conversations) - len(examples), max_length)
    if not examples:
        raise ValueError(f"no example has an assistant token within max_length={max_length}")
    return examples


def add_lora(base, config: TrainConfig):
    """Freeze the base and wrap the targeted projections in PEFT LoRA layers (B starts at zero)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("lora-serve train needs HF PEFT: pip install peft") from None

    num_layers = base.config.num_hidden_layers
    top = min(config.top_layers or num_layers, num_layers)
    lora = LoraConfig(
        layers_to_transform=list(range(num_layers - top, num_layers)) if top < num_layers else None,
        task_type="CAUSAL_LM",
        r=config.r,
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # PEFT annotates int; scaling is lora_alpha / r
        target_modules=list(config.target_modules),
        lora_dropout=config.lora_dropout,
        bias="none",
        use_dora=config.use_dora,
    )
    return get_peft_model(base, lora)  # marks only lora_A / lora_B (and DoRA's lora_magnitude_vector) trainable


def assistant_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (assistant) tokens, as HF's `labels=` loss,
    but the output layer runs only where there is a label: about a third of the tokens here,
    and the output layer (vocab x hidden) is a fifth of a 135M model's compute."""
    causal_lm = model.get_base_model()  # *ForCausalLM with the LoRA layers in place
    hidden = causal_lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
    targets = labels[:, 1:]  # position t predicts token t+1
    keep = targets != IGNORE_INDEX  # [B, T-1]
    logits = causal_lm.lm_head(hidden[:, :-1][keep])  # [N, V], N labelled tokens
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def _batches(examples: list[Example], batch_size: int, num_steps: int, generator: torch.Generator) -> Iterator[list[Example]]:
    """num_steps batches; each epoch is a fresh seeded permutation (the last batch of an epoch may be short)."""
    step = 0
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            if step == num_steps:
                return
            yield [examples[i] for i in order[start : start + batch_size]]
            step += 1


def save_adapter(model, output_dir: Path, dtype: torch.dtype) -> None:
    """adapter_config.json + adapter_model.safetensors in output_dir; other files there are left alone."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    had_readme = (output_dir / "README.md").exists()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(dtype)
    # save_embedding_layers=False: embeddings never train here, and PEFT would look the base up to check.
    model.save_pretrained(output_dir, safe_serialization=True, save_embedding_layers=False)
    if not had_readme:  # PEFT's boilerplate model card; the folder holds the adapter only
        (output_dir / "README.md").unlink(missing_ok=True)
    _sort_target_modules(output_dir / CONFIG_FILE)


def _sort_target_modules(config_file: Path) -> None:
    # PEFT writes target_modules from a set, in string-hash order, which changes from process to process.
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
