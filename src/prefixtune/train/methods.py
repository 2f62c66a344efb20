"""Training methods: what is trained inside the one loop (train/loop.py), behind one small interface.

A method owns its trainable tensors and knows how to run a row (which prefix, if any), checkpoint its state
and save its adapters. Everything else (batches, micro-batching, OOM back-off, autocast, evals, early stopping,
checkpoints, resume, DDP, loss check, reports) is the loop's, so every method gets all of it.
Add a method: implement the interface below, register it in `build_method`, and add its name to
`preflight.METHODS`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from prefixtune.prefix.model import PrefixModel

_ATTENTION_HINTS = ("attn", "attention")


class TrainMethod:
    """The interface the loop calls; PrefixMethod and LoraMethod implement it."""

    kind = "base"
    model: PrefixModel

    def parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def row_adapters(self, names: Sequence[str]) -> list[str | None]:
        """The PrefixModel adapter each row runs with (None = no prefix)."""
        return list(names)

    @property
    def prefix_of(self) -> Callable[[str], torch.Tensor | None] | None:
        """For eval_loss: None = use the model's own encoders by name."""
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def save(self, trainer, root: Path, metrics: dict[str, Any]) -> dict[str, Path]:
        """Write every adapter under root/<name>; returns name -> folder."""
        raise NotImplementedError

    def close(self) -> None:
        """Give the caller's base model back as it was."""


class PrefixMethod(TrainMethod):
    """Prefix tuning: one PrefixEncoder per adapter (added by plan_run), rows pick theirs by name."""

    kind = "prefix"

    def __init__(self, model: PrefixModel):
        self.model = model

    def parameters(self):
        return [p for p in self.model.encoders.parameters() if p.requires_grad]

    def state_dict(self):
        return self.model.encoders.state_dict()

    def load_state_dict(self, state):
        self.model.encoders.load_state_dict(state)

    def save(self, trainer, root, metrics):
        from prefixtune.train.saving import save_adapters

        return save_adapters(trainer, root, metrics)


class LoraMethod(TrainMethod):
    """PEFT LoRA injected into the frozen base (removed again by close); every row runs without a prefix."""

    kind = "lora"

    def __init__(self, model: PrefixModel, cfg):
        from peft import get_peft_model

        self.model, self.cfg = model, cfg
        with quiet_peft():
            self.peft_model = get_peft_model(model.base, lora_config(model.base, cfg))
        if cfg.lora_dropout > 0:  # the base stays in eval mode (as for prefixes); only LoRA dropout trains
            for name, module in self.peft_model.named_modules():
                if "lora_dropout" in name:
                    module.train()
        self._params = {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad}
        for p in self._params.values():  # trainable weights in fp32 even on a bf16 base, as prefix encoders
            p.data = p.data.float()

    def parameters(self):
        return list(self._params.values())

    def row_adapters(self, names):
        return [None] * len(names)

    @property
    def prefix_of(self):
        return lambda _: None

    def state_dict(self):
        return {n: p.detach() for n, p in self._params.items()}

    def load_state_dict(self, state):
        missing = sorted(set(self._params) ^ set(state))
        if missing:
            raise ValueError(f"LoRA checkpoint does not match this model (differing tensors: {missing[:3]} ...)")
        with torch.no_grad():
            for n, p in self._params.items():
                p.copy_(state[n])

    def save(self, trainer, root, metrics):
        from prefixtune.fileio import atomic_folder
        from prefixtune.store import writing

        target = Path(root) / self.cfg.name
        with writing(f"write the adapter folder {target}"), atomic_folder(target) as tmp:  # a full disk: StoreError
            self.peft_model.save_pretrained(str(tmp))
        return {self.cfg.name: target}

    def close(self):
        self.peft_model.unload()  # the caller's base model comes back without LoRA layers


def build_method(cfg, model: PrefixModel) -> TrainMethod:
    if cfg.method == "lora":
        return LoraMethod(model, cfg)
    return PrefixMethod(model)


# ---- LoRA helpers (also used by compare to evaluate a saved LoRA adapter) ---------------------------------

def attention_targets(model: torch.nn.Module) -> list[str]:
    """Full names of the linear layers inside attention blocks (q/k/v/o, or GPT-2's c_attn/c_proj)."""
    from prefixtune.train.config import ConfigError

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
        raise ConfigError(f"{type(model).__name__}: found no linear layers inside attention blocks; pass the "
                          f"LoRA target modules explicitly (--lora-targets q_proj,v_proj)")
    return names


def lora_config(model: torch.nn.Module, cfg):
    from peft import LoraConfig

    targets = cfg.lora_targets or attention_targets(model)
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


@contextmanager
def quiet_peft():
    # peft 0.21 calls transformers' deprecated is_gradient_checkpointing; the warning is not ours to act on.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@contextmanager
def lora_applied(model: torch.nn.Module, folder: str | Path):
    """Inject a saved LoRA adapter into `model` in place for the duration of the block, then remove it."""
    from peft import PeftModel

    with quiet_peft():
        peft_model = PeftModel.from_pretrained(model, str(folder))
    peft_model.eval()
    try:
        yield peft_model
    finally:
        peft_model.unload()
