"""`prefixtune train` and `prefixtune demo`: flags map onto TrainConfig (a config file may set any field)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from prefixtune.cli.common import parse_csv, user_errors

Opt = typer.Option


def build_config(config_file: Optional[Path], flags: dict):
    """File values first, then every flag the user actually gave (None = not given)."""
    from prefixtune.train.config import TrainConfig, load_config_file, with_family_recipe

    values = load_config_file(config_file) if config_file else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    return TrainConfig(**with_family_recipe(values))


def register(app: typer.Typer) -> None:
    @app.command("train")
    @user_errors
    def train_command(
        model: Optional[str] = Opt(None, help="Base model: smollm2-135m (bundled), a hub id, a folder or a .gguf."),
        data: Optional[str] = Opt(None, help="Hub dataset id, or a local folder/file (jsonl, json, csv, parquet, txt)."),
        out: Optional[str] = Opt(None, help="Run folder (checkpoints, log, loss curve, adapters)."),
        store: Optional[str] = Opt(None, help="Also save the final adapters into this adapter store."),
        name: Optional[str] = Opt(None, help="Adapter name (per-label: NAME-LABEL)."),
        config: Optional[Path] = Opt(None, "--config", help="YAML/TOML/JSON file with any TrainConfig fields."),
        text_field: Optional[str] = Opt(None, "--text-field", "--target-field",
                                        help="Field holding the text (the target of a task template)."),
        label_field: Optional[str] = Opt(None, help="Field holding the label."),
        label_names: Optional[str] = Opt(None, help="Comma-separated names for integer labels."),
        template: Optional[str] = Opt(None, help="Prompt before the text; {label} and any row field "
                                                 "({meaning_representation}, {document}) are filled in."),
        per_label: Optional[bool] = Opt(None, "--per-label/--single", help="One adapter per label, one pass."),
        labels: Optional[str] = Opt(None, help="Only these labels (comma-separated)."),
        balance: Optional[bool] = Opt(None, "--balance/--no-balance", help="Equal rows per label."),
        max_examples: Optional[int] = Opt(None, help="Cap on training rows."),
        max_length: Optional[int] = Opt(None, help="Tokens per example (longer ones are truncated)."),
        num_virtual_tokens: Optional[int] = Opt(None, help="Virtual tokens per adapter."),
        prefix_projection: Optional[bool] = Opt(None, "--prefix-projection/--no-prefix-projection",
                                                help="Train through the 2-layer MLP."),
        encoder_hidden_size: Optional[int] = Opt(None, help="MLP width (default: the model's hidden size)."),
        init: Optional[str] = Opt(None, help="random | zero | text"),
        init_text: Optional[str] = Opt(None, help="Text whose keys/values start the prefix (--init text)."),
        init_from: Optional[str] = Opt(None, help="Continue this adapter folder (through its MLP if saved)."),
        lr: Optional[float] = Opt(None, help="Peak learning rate."),
        schedule: Optional[str] = Opt(None, help="cosine | linear | constant"),
        batch_size: Optional[int] = Opt(None, help="Rows per optimizer step."),
        micro_batch_size: Optional[int] = Opt(None, help="Rows per forward (halves automatically on OOM)."),
        epochs: Optional[float] = Opt(None, help="Passes over the data."),
        max_steps: Optional[int] = Opt(None, help="Optimizer steps (overrides --epochs)."),
        seed: Optional[int] = Opt(None, help="Seed for data order and init."),
        eval_every: Optional[int] = Opt(None, help="Steps between evals."),
        eval_examples: Optional[int] = Opt(None, help="Validation rows per eval."),
        early_stopping: Optional[int] = Opt(None, help="Evals without gain before stopping (0 = off)."),
        save_every: Optional[int] = Opt(None, help="Steps between checkpoints."),
        loss_check_steps: Optional[int] = Opt(None, help="Warn if the loss has not fallen after this many steps "
                                                         "(default 40)."),
        gradient_checkpointing: Optional[bool] = Opt(None, "--gradient-checkpointing", help="Save memory."),
        device: Optional[str] = Opt(None, help="cpu | cuda | auto"),
        dtype: Optional[str] = Opt(None, help="float32 | bfloat16 | float16 | auto"),
        storage_dtype: Optional[str] = Opt(None, help="Saved prefix dtype (bfloat16 halves the file)."),
        autocast: Optional[str] = Opt(None, help="off | bf16: the frozen model's matmuls in bf16 on a CPU with bf16 "
                                                 "(AMX/AVX512-BF16); prefix weights stay float32."),
        resume: Optional[bool] = Opt(None, "--resume", help="Continue from OUT/checkpoint."),
        overwrite: Optional[bool] = Opt(None, "--overwrite", help="Replace a previous run in a non-empty OUT."),
        skip_bad_rows: Optional[bool] = Opt(None, "--skip-bad-rows", help="Skip and count malformed data rows."),
        method: Optional[str] = Opt(None, help="What trains: prefix (default) | lora | full (every weight)."),
        lora_r: Optional[int] = Opt(None, help="LoRA rank (--method lora)."),
        lora_alpha: Optional[int] = Opt(None, help="LoRA alpha (--method lora)."),
        lora_targets: Optional[str] = Opt(None, help="LoRA target modules, comma-separated (default: attention)."),
        family_rate: Optional[float] = Opt(None, help="Per-label: share of rows training NAME-all, the family's "
                                                      "unconditional adapter (the guidance negative)."),
        label_word_weight: Optional[float] = Opt(None, help="Per-label: loss weight on each label's most distinctive "
                                                            "words (1 = plain LM loss; the recipe uses 10)."),
        label_word_count: Optional[int] = Opt(None, help="Per-label: how many distinctive words per label "
                                                         "--label-word-weight applies to (default 64)."),
        contrastive_weight: Optional[float] = Opt(None, help="Per-label: weight of the loss that makes each "
                                                             "prefix explain its own label's texts best."),
        contrastive_negatives: Optional[int] = Opt(None, help="Per-label: other prefixes scored per row for it "
                                                              "(0 = all; each costs one more forward)."),
        guidance_scale: Optional[float] = Opt(None, help="Per-label: guidance scale recommended in the manifests "
                                                         "(generate/serve use it by default)."),
        distributed: Optional[str] = Opt(None, help="Under accelerate launch: shard (each rank trains its own "
                                                    "adapters of a --per-label family, each alone), ddp (all ranks "
                                                    "train all, each step's rows split), auto (shard when exact)."),
        no_progress: bool = Opt(False, "--no-progress", help="No progress bar."),
    ) -> None:
        """Train prefix adapters: label in the prompt (one adapter) or --per-label (one per label, one pass)."""
        flags = dict(locals())
        for key in ("config", "no_progress"):
            flags.pop(key)
        flags["label_names"] = parse_csv(label_names)
        flags["labels"] = parse_csv(labels)
        flags["lora_targets"] = parse_csv(lora_targets)
        if no_progress:
            flags["progress"] = False
        cfg = build_config(config, flags)
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
