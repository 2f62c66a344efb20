"""`prefixtune train` and `prefixtune demo`: flags map onto TrainConfig (a config file may set any field)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from prefixtune.cli.common import user_errors
from prefixtune.cli.derive import Spec, config_flags

Opt = typer.Option

# Settings only a config file sets, each with why it has no flag.
CONFIG_FILE_ONLY = {
    "weight_decay": "AdamW detail; 0 suits prefixes",
    "warmup_ratio": "schedule detail",
    "grad_clip": "schedule detail",
    "lora_dropout": "LoRA detail",
}
PER_LABEL = {"per_label": ("--per-label/--single",)}  # train and compare spell the family switch alike
TRAIN = Spec("prefixtune.train.config:TrainConfig", exclude=CONFIG_FILE_ONLY,
             names={"text_field": ("--text-field", "--target-field"), **PER_LABEL})


def build_config(config_file: Optional[Path], flags: dict):
    """File values first, then every flag the user actually gave."""
    from prefixtune.train.config import TrainConfig, load_config_file, with_family_recipe

    values = load_config_file(config_file) if config_file else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    return TrainConfig(**with_family_recipe(values))


def register(app: typer.Typer) -> None:
    @app.command("train")
    @user_errors
    @config_flags(TRAIN)
    def train_command(
        config: Optional[Path] = Opt(None, "--config", help="YAML/TOML/JSON file with any TrainConfig fields."),
        **given: Any,
    ) -> None:
        """Train prefix adapters: label in the prompt (one adapter) or --per-label (one per label, one pass)."""
        cfg = build_config(config, given)
        from prefixtune.train.run import train

        result = train(cfg)
        if result.interrupted:
            raise typer.Exit(130)
        for adapter, folder in result.adapters.items():
            typer.echo(f"adapter {adapter}: {folder}")

    @app.command("demo")
    @user_errors
    def demo_command(
        model: str = Opt("smollm2-135m", help="Base model."),
        data: str = Opt("dair-ai/emotion", help="Emotion data: hub id or the local folder."),
        out: str = Opt("runs/demo", help="Run folder; adapters land in OUT/adapters."),
        quick: bool = Opt(False, "--quick", help="A short run (CI): fewer rows and steps."),
        steps: Optional[int] = Opt(None, help="Optimizer steps (default 150, quick 25)."),
    ) -> None:
        """The main job: per-label emotion adapters in one pass, then one sample per emotion in one mixed batch."""
        from prefixtune.demo import run_demo

        run_demo(model=model, data=data, out=out, quick=quick, steps=steps)
