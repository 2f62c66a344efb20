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
    """The interface the loop calls; PrefixMethod, LoraMethod and FullMethod implement it."""

    kind = "base"
    model: PrefixModel
    weights_file = "adapter_model.safetensors"  # the file save() writes the trained weights into, per folder
    trains_base = False  # the base model's own weights train (its parameter count is then all trainable)

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


class WeightsMethod(TrainMethod):
    """A method that trains weights inside the base model (`_params`, name -> parameter); rows run without a
    prefix."""

    _params: dict[str, torch.nn.Parameter]

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
        differing = sorted(set(self._params) ^ set(state))
        if differing:
            raise ValueError(f"{self.kind} checkpoint does not match this model (differing tensors: "
                             f"{differing[:3]} ...)")
        with torch.no_grad():
            for n, p in self._params.items():
                p.copy_(state[n])


class LoraMethod(WeightsMethod):
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

    def save(self, trainer, root, metrics):
        from prefixtune.adapter_folder import writing
        from prefixtune.fileio import atomic_folder

        target = Path(root) / self.cfg.name
        with writing(f"write the adapter folder {target}"), atomic_folder(target) as tmp:  # a full disk: StoreError
            self.peft_model.save_pretrained(str(tmp))
        return {self.cfg.name: target}

    def close(self):
        self.peft_model.unload()  # the caller's base model comes back without LoRA layers


class FullMethod(WeightsMethod):
    """Full fine-tuning, the baseline prefix tuning and LoRA are measured against: every weight of the base
    trains (float32 master weights, AdamW's two moments beside them) and rows run without a prefix. The saved
    folder is a whole model (safetensors + config + tokenizer) that loads as a base model anywhere."""

    kind = "full"
    weights_file = "model.safetensors"
    trains_base = True

    def __init__(self, model: PrefixModel, cfg, shared: bool):
        self.model, self.cfg = model, cfg
        self._params = dict(model.base.named_parameters())  # tied weights (embeddings = LM head) once
        # A base the caller passed in must come back untouched (close); one this run loaded is dropped with it,
        # so it keeps no copy (which would also count in the peak memory compare reports).
        self._original = {n: p.detach().clone() for n, p in self._params.items()} if shared else None
        for p in self._params.values():
            p.data = p.data.float()  # master weights in fp32 even on a bf16 base: bf16 Adam updates round to 0
            p.requires_grad_(True)

    def save(self, trainer, root, metrics):
        from prefixtune.fileio import atomic_folder

        target = Path(root) / self.cfg.name
        with atomic_folder(target) as tmp:
            # One file, whatever the size: compare reads its size, and a base model loads from the folder.
            self.model.base.save_pretrained(str(tmp), max_shard_size="1000GB")
            trainer.plan.loaded.tokenizer.save_pretrained(str(tmp))
        return {self.cfg.name: target}

    def close(self):
        for p in self._params.values():
            p.requires_grad_(False)
        if self._original is not None:
            for n, p in self._params.items():
                p.data = self._original[n]
            self._original = None


def build_method(cfg, model: PrefixModel, shared: bool = True) -> TrainMethod:
    """`shared`: the base model came from the caller (a method that changes it must give it back)."""
    if cfg.method == "lora":
        return LoraMethod(model, cfg)
    if cfg.method == "full":
        return FullMethod(model, cfg, shared)
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


@contextmanager
def full_applied(model: torch.nn.Module, folder: str | Path):
    """Run `model` with a fully fine-tuned model's weights (a FullMethod folder) for the block, then give its own
    back. Yields a context manager that puts the base weights back for a while (the latency's base reference),
    as a LoRA model's disable_adapter does."""
    from safetensors.torch import load_file

    from prefixtune.errors import UserError

    params = dict(model.named_parameters())  # tied weights once, as FullMethod saved them
    file = Path(folder) / FullMethod.weights_file
    tuned = load_file(str(file), device=str(next(iter(params.values())).device))
    if missing := sorted(set(params) - set(tuned)):
        raise UserError(f"{file} is not a fine-tuned copy of this base model (it lacks {missing[:3]} ...)")
    original = {n: p.data for n, p in params.items()}

    def use(weights: dict[str, torch.Tensor]) -> None:
        for n, p in params.items():
            p.data = weights[n].to(original[n].dtype)

    @contextmanager
    def base_weights():
        use(original)
        try:
            yield
        finally:
            use(tuned)

    use(tuned)
    try:
        yield base_weights
    finally:
        use(original)
