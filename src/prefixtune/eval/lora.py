"""The LoRA baseline: PEFT LoRA trained on exactly the batches prefix tuning sees.

Rows, template, tokenization, batch order, optimizer, schedule, clipping and the loss code path are the prefix
trainer's own (split_rows, tokenize, epoch_batches, collate, AdamW + get_scheduler, PrefixModel's loss), so
a difference in the comparison comes from the adaptation method and nothing else.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefixtune.data import DataError
from prefixtune.prefix.model import PrefixModel
from prefixtune.prefix.peft_io import atomic_folder
from prefixtune.train.config import TrainConfig
from prefixtune.train.evaluation import eval_loss
from prefixtune.train.examples import Tokenized, collate, epoch_batches, tokenize
from prefixtune.templates import input_fields, is_task_template
from prefixtune.train.plan import split_rows, tokenize_rows
from prefixtune.train.report import peak_memory_mb, plot_losses, write_log

ADAPTER_DIR = "adapter"  # run folder subfolder holding PEFT's adapter_config.json + adapter_model.safetensors
_ATTENTION_HINTS = ("attn", "attention")


@dataclass
class LoraSettings:
    """LoRA hyperparameters (everything else comes from the shared TrainConfig)."""

    r: int = 8  # rank of the update matrices
    alpha: int = 16  # scaling numerator (update is scaled by alpha / r)
    dropout: float = 0.0  # dropout on the LoRA input (0 keeps training deterministic, like prefix training)
    targets: list[str] | None = None  # module names to adapt; None = every attention projection

    def validate(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


@dataclass
class LoraResult:
    out: Path  # run folder
    adapter: Path  # PEFT adapter folder
    summary: dict[str, Any]  # same keys as the prefix trainer's summary
    history: list[dict[str, Any]] = field(default_factory=list)  # train/eval log rows


def attention_targets(model: torch.nn.Module) -> list[str]:
    """Full names of the linear layers inside attention blocks (q/k/v/o, or GPT-2's c_attn/c_proj)."""
    linear_types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2 style "linear" layers

        linear_types += (Conv1D,)
    except ImportError:
        pass
    names = []
    for name, module in model.named_modules():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if isinstance(module, linear_types) and any(h in parent.rsplit(".", 1)[-1].lower() for h in _ATTENTION_HINTS):
            names.append(name)
    if not names:
        raise DataError(f"{type(model).__name__}: found no linear layers inside attention blocks; pass the "
                        f"LoRA target modules explicitly (--lora-targets q_proj,v_proj)")
    return names


def lora_config(model: torch.nn.Module, settings: LoraSettings):
    from peft import LoraConfig

    settings.validate()
    targets = settings.targets or attention_targets(model)
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


def _rows(cfg: TrainConfig, data, tokenizer, say, loaded=None) -> tuple[list[Tokenized], list[Tokenized], int]:
    """Train/validation rows exactly as train.plan.plan_run builds them for a single adapter."""
    template, train_ex, val_ex = split_rows(cfg, data, say)
    adapter_of = lambda ex: "lora"  # noqa: E731  (one adapter; the label is in the prompt)
    if loaded is not None and is_task_template(template):  # input fields -> target, as the prefix trainer
        return tokenize_rows(cfg, loaded, template, train_ex, val_ex, adapter_of, say)
    train_rows, truncated = tokenize(train_ex, tokenizer, template, adapter_of, cfg.max_length)
    val_rows, _ = tokenize(val_ex, tokenizer, template, adapter_of, cfg.max_length)
    return train_rows, val_rows, truncated


def _loss(model: PrefixModel, batch, device, micro: int, total: int) -> float:
    """Forward/backward in micro-batches, each weighted by its share of the tokens (as the prefix trainer)."""
    loss_sum = 0.0
    for start in range(0, len(batch.adapters), micro):
        part = batch.rows(start, start + micro)
        out = model(part.input_ids.to(device), part.attention_mask.to(device),
                    adapters=[None] * len(part.adapters), labels=part.labels.to(device))
        (out.loss * (out.num_tokens / max(total, 1))).backward()
        loss_sum += float(out.loss.detach()) * out.num_tokens
    return loss_sum / max(total, 1)


@torch.no_grad()
def _evaluate(model: PrefixModel, rows: list[Tokenized], batch_size: int, pad_id: int, device,
              progress: bool) -> float:
    from tqdm.auto import tqdm

    with tqdm(total=len(rows), desc="lora: eval", disable=not progress, leave=False) as bar:
        # LoRA lives in the base weights: every row runs without a prefix.
        return eval_loss(model, rows, pad_id, batch_size, device, prefix_of=lambda _: None, bar=bar).loss


def train_lora(cfg: TrainConfig, settings: LoraSettings | None = None, loaded=None, data=None,
               say=print) -> LoraResult:
    """Train a LoRA adapter under `cfg`'s data/steps/batch/optimizer settings; saves it under cfg.out/adapter.

    A `loaded` model passed in is left as it was (the LoRA layers are removed again at the end).
    """
    from peft import get_peft_model
    from transformers import get_scheduler

    from prefixtune.data import load_data
    from prefixtune.models import load_base_model

    settings = settings or LoraSettings()
    cfg.validate()
    if cfg.per_label:
        raise ValueError("the LoRA baseline trains one adapter with the label in the prompt; per_label is "
                         "prefix-only")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # LoRA's A matrices are randomly initialised
    loaded = loaded or load_base_model(cfg.model, cfg.device, cfg.dtype)
    data = data or load_data(cfg.data, cfg.text_field, cfg.label_field, cfg.label_names,
                             input_fields=input_fields(cfg.template))
    tok = loaded.tokenizer
    train_rows, val_rows, truncated = _rows(cfg, data, tok, say, loaded)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    per_epoch = len(train_rows) // cfg.batch_size + (len(train_rows) % cfg.batch_size > 0)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))

    device = loaded.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wrapper = PrefixModel(loaded.model)  # freezes the base first; LoRA's own weights are added trainable after
    base_params = sum(p.numel() for p in loaded.model.parameters())
    with _quiet_peft():
        peft_model = get_peft_model(loaded.model, lora_config(loaded.model, settings))
    if settings.dropout > 0:  # the base stays in eval mode (as in prefix training); only LoRA dropout trains
        for name, module in peft_model.named_modules():
            if "lora_dropout" in name:
                module.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    for p in params:  # trainable weights in fp32 even on a bf16 base, as the prefix encoders are
        p.data = p.data.float()
    trainable = sum(p.numel() for p in params)
    say(f"LoRA r={settings.r} on {loaded.name}: {trainable:,} trainable params, {len(train_rows)} train / "
        f"{len(val_rows)} eval rows, {total_steps} steps")

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler({"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
        cfg.schedule], optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps)
    micro = cfg.micro_batch_size or cfg.batch_size
    history: list[dict[str, Any]] = []
    step, epoch, seconds, tokens = 0, 0, 0.0, 0
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, disable=not cfg.progress, desc="lora", unit="step", dynamic_ncols=True)
    try:
        while step < total_steps:
            for indices in epoch_batches(train_rows, cfg.batch_size, cfg.seed, epoch):
                if step >= total_steps:
                    break
                batch = collate([train_rows[i] for i in indices], pad_id)
                started = time.perf_counter()
                total = int((batch.labels[:, 1:] != -100).sum())
                loss = _loss(wrapper, batch, device, micro, total)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                seconds += time.perf_counter() - started
                tokens += batch.real_tokens
                step += 1
                tps = tokens / max(seconds, 1e-9)
                history.append({"kind": "train", "step": step, "loss": loss, "lr": scheduler.get_last_lr()[0],
                                "tokens_per_s": tps})
                bar.set_postfix({"loss": f"{loss:.3f}", "tok/s": f"{tps:.0f}"})
                bar.update(1)
            epoch += 1
        bar.close()
        peak = peak_memory_mb(device)
        eval_loss = (_evaluate(wrapper, val_rows, cfg.batch_size, pad_id, device, cfg.progress) if val_rows
                     else float("nan"))
        history.append({"kind": "eval", "step": step, "eval_loss": eval_loss,
                        "perplexity": math.exp(min(eval_loss, 50))})
        out = Path(cfg.out)
        adapter = _save(peft_model, out / ADAPTER_DIR)
    finally:
        peft_model.unload()  # the caller's base model comes back without LoRA layers
    write_log(out, history)
    plot_losses(history, out / "loss_curve.png", title="LoRA training")
    summary = {
        "steps": step,
        "train rows": len(train_rows),
        "trainable params": trainable,
        "trainable %": 100.0 * trainable / base_params,
        "adapter file bytes": (adapter / "adapter_model.safetensors").stat().st_size,
        "train seconds": seconds,
        "real tokens/s": tokens / max(seconds, 1e-9),
        "best eval loss": eval_loss,
        "peak memory MB": peak,
        "truncated examples": truncated,
    }
    return LoraResult(out, adapter, summary, history)


def _save(peft_model, target: Path) -> Path:
    """PEFT's save_pretrained into a temp folder renamed into place: the folder appears whole or not at all."""
    with atomic_folder(target) as tmp:
        peft_model.save_pretrained(str(tmp))
    return target


@contextmanager
def _quiet_peft():
    # peft 0.21 calls transformers' deprecated is_gradient_checkpointing; the warning is not ours to act on.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@contextmanager
def lora_applied(model: torch.nn.Module, folder: str | Path):
    """Inject a saved LoRA adapter into `model` in place for the duration of the block, then remove it."""
    from peft import PeftModel

    with _quiet_peft():
        peft_model = PeftModel.from_pretrained(model, str(folder))
    peft_model.eval()
    try:
        yield peft_model
    finally:
        peft_model.unload()
