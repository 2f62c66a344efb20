"""Adapter folders from a training run: PEFT files, trainable state and the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefixtune.adapter_folder import Manifest, write_adapter_folder
from prefixtune.store import AdapterStore
from prefixtune.templates import input_fields


def save_adapters(trainer, root: Path, metrics: dict[str, Any]) -> dict[str, Path]:
    """Write every adapter of the run under root/<name>; returns name -> folder."""
    cfg, plan, model = trainer.cfg, trainer.plan, trainer.model
    shape = model.shape
    out: dict[str, Path] = {}
    progress = trainer.progress
    tps = progress.tokens / max(progress.train_seconds, 1e-9)
    for name, label in plan.adapter_labels.items():
        encoder = model.encoders[name]
        own = dict(metrics)
        per = own.pop("per_adapter", {})
        if name in per:
            own["eval_loss_own"] = per[name]
        own.update(step=progress.step, tokens_per_s=tps)
        manifest = Manifest(
            name=name,
            base_model=cfg.model,
            base_fingerprint=plan.loaded.fingerprint,
            shape={"num_layers": shape.num_layers, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim},
            prefix=encoder.config.to_dict(),
            template=plan.template,
            label=label,
            labels=[x for x in plan.adapter_labels.values() if x is not None] if plan.family or label is not None
            else plan.data.labels,
            fields=input_fields(plan.template) or None,
            dataset={"source": cfg.data, "fingerprint": plan.data.fingerprint,
                     "train_rows": len(plan.train_rows), "eval_rows": len(plan.val_rows)},
            hyperparams=cfg.to_dict(),
            metrics=own,
            guidance=_guidance(cfg, plan, label),
        )
        out[name] = write_adapter_folder(root / name, encoder.fold(), shape, encoder.config, manifest, encoder,
                                         cfg.storage_dtype)
    return out


def _guidance(cfg, plan, label: str | None) -> dict[str, Any]:
    """What a per-label adapter recommends for generation: guidance against the family adapter, if any.

    The family adapter (NAME-all) writes in the data's style without a label, so guidance against it
    sharpens only the label; against the base model it also sharpens the style ("i feel angry i feel
    angry ..." where the base model would put a comma), which costs diversity. docs/BENCHMARKS.md "Control quality".
    """
    if label is None or cfg.guidance_scale is None:
        return {}
    return {"scale": cfg.guidance_scale, "negative": plan.family}


def publish(store_root: str | Path, folders: dict[str, Path], say) -> dict[str, Path]:
    """A completed run's adapters into the store, all together (AdapterStore.put_all); name -> stored folder."""
    store = AdapterStore(store_root)
    for name in folders:
        if store.exists(name):
            say(f"store {store.root}: replacing adapter {name} with this run's")
    return store.put_all(folders)
