"""`prefixtune eval` and `prefixtune compare`: flags map onto EvalConfig / CompareConfig."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from prefixtune.cli.common import parse_csv, parse_floats, user_errors

Opt = typer.Option


def _config_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad settings (judge spec, methods, config file) are user errors too: one line, exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from prefixtune.eval.compare import CompareConfigError, TrainingFailed
        from prefixtune.eval.judge import JudgeError

        try:
            return fn(*args, **kwargs)
        except (JudgeError, CompareConfigError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except TrainingFailed as err:  # the child printed its own traceback; one line is enough here
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _given(flags: dict[str, Any], csv: tuple[str, ...] = ()) -> dict[str, Any]:
    """The flags the user actually gave (None = not given), comma lists split."""
    out = {k: v for k, v in flags.items() if v is not None}
    for key in csv:
        if key in out:
            out[key] = parse_csv(out[key])
    return out


COMPOSE_ONLY = {"compose", "compose_data", "compose_methods", "compose_weights", "instruction"}


def _compose_eval(flags: dict[str, Any], no_progress: bool) -> None:
    """`eval --compose A,B`: the single-adapter flags that do not apply are refused by name."""
    from prefixtune.eval.compose import ComposeEvalConfig, run_compose_eval

    values = _given(flags, csv=("compose", "compose_data", "compose_methods", "compose_weights"))
    allowed = {f for f in ComposeEvalConfig.__dataclass_fields__} | COMPOSE_ONLY
    extra = sorted(k for k in values if k not in allowed or k == "data")
    if extra:
        raise typer.BadParameter(f"not used with --compose: {', '.join('--' + k.replace('_', '-') for k in extra)}",
                                 param_hint="--compose")
    values["families"] = values.pop("compose")
    if "compose_weights" in values:
        values["compose_weights"] = parse_floats(values["compose_weights"], "--compose-weights")
    for old, new in (("compose_data", "data"), ("compose_methods", "methods"), ("compose_weights", "weights")):
        if old in values:
            values[new] = values.pop(old)
    if no_progress:
        values["progress"] = False
    report = run_compose_eval(ComposeEvalConfig(**values))
    for name, r in report["results"].items():
        aspects = ", ".join(f"{f} {a:.2f}" for f, a in r["aspects"].items())
        typer.echo(f"{name}: joint {r['joint']:.2f} ({aspects}), {r['mean_words']:.1f} words, distinct-2 "
                   f"{r['distinct_2']:.2f}, degenerate {r['degenerate']:.0%}")


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @user_errors
    @_config_errors
    def eval_command(
        adapter: Optional[str] = Opt(None, help="Adapter name, or NAME of a per-label family NAME-<label>."),
        compose: Optional[str] = Opt(None, help="Comma-separated per-label families to compose on one row (e.g. "
                                                "emotion,agnews): every label combination, each aspect judged."),
        compose_data: Optional[str] = Opt(None, help="--compose: each family's data, comma-separated (default: "
                                                     "what its adapters were trained on)."),
        compose_methods: Optional[str] = Opt(None, help="--compose: what to sample, comma-separated: guidance, "
                                                        "concat (composed), alone, prompting (baselines); default "
                                                        "all."),
        compose_weights: Optional[str] = Opt(None, help="--compose: each family's guidance scale in the product "
                                                        "of experts, comma-separated in --compose order (default: "
                                                        "the engine's rule, engine/compose.py)."),
        instruction: Optional[str] = Opt(None, help="--compose: the prompting baseline's request, {0} {1} = the "
                                                    "families' labels."),
        data: Optional[str] = Opt(None, help="Data to evaluate on (default: the adapter's training data)."),
        store: Optional[str] = Opt(None, help="Adapter store (default $PREFIXTUNE_HOME/adapters)."),
        model: Optional[str] = Opt(None, help="Base model (default: the one the adapter was trained on)."),
        split: Optional[str] = Opt(None, help="Split to evaluate (default test)."),
        samples_per_label: Optional[int] = Opt(None, help="Generated samples per label (default 8)."),
        seed: Optional[int] = Opt(None, help="Seed for row sampling and every sample's stream."),
        eval_examples: Optional[int] = Opt(None, help="Rows scored for eval loss (default 256)."),
        max_new_tokens: Optional[int] = Opt(None, help="Tokens per sample (default 40)."),
        temperature: Optional[float] = Opt(None, help="Sampling temperature (default 1.0)."),
        top_p: Optional[float] = Opt(None, help="Nucleus sampling mass (default 1.0)."),
        min_p: Optional[float] = Opt(None, help="Drop tokens under this share of the likeliest one's probability "
                                                "(default 0: the model's own tail)."),
        eval_batch_size: Optional[int] = Opt(None, "--batch-size", help="Rows per forward pass (default 16)."),
        reference_field: Optional[str] = Opt(None, help="Field with reference outputs: adds BLEU, chrF, ROUGE-L "
                                                        "(task adapters: default their target field)."),
        reference_rows: Optional[int] = Opt(None, help="Rows scored against references (default 100; task "
                                                       "adapters: distinct inputs)."),
        num_beams: Optional[int] = Opt(None, help="Task adapters: beam search width for each input (default 1 = "
                                                  "greedy)."),
        judge: Optional[str] = Opt(None, help="Custom judge as module:factory (default TF-IDF + logistic regression)."),
        latency_tokens: Optional[int] = Opt(None, help="Tokens per row when timing generation (default 32)."),
        latency_repeats: Optional[int] = Opt(None, help="Timed generation runs (default 3; 0 = skip latency)."),
        out: Optional[str] = Opt(None, help="Report folder (default runs/eval/ADAPTER)."),
        guidance_scale: Optional[float] = Opt(None, help="Guidance for the samples (1 = off; default: what the "
                                                         "adapters recommend)."),
        guidance_negative: Optional[str] = Opt(None, help="Adapter guidance contrasts with (none = base model)."),
        guidance_sweep: Optional[str] = Opt(None, help="Comma-separated scales: accuracy vs distinct-2 vs length "
                                                       "(table + guidance_sweep.png)."),
        save_guidance: Optional[bool] = Opt(None, "--save-guidance", help="Record the sweep's best scale that "
                                                                          "keeps natural text in the manifests."),
        sweep: Optional[bool] = Opt(None, "--sweep", help="Also sample a temperature x top-p grid with the default "
                                                          "guidance (table + sampling_sweep.png)."),
        sweep_temperatures: Optional[str] = Opt(None, help="The sweep's temperatures (default 0.7,0.8,0.9,1)."),
        sweep_top_ps: Optional[str] = Opt(None, help="The sweep's top-p values (default 0.9,0.95,1)."),
        text_field: Optional[str] = Opt(None, help="Field holding the text (default: as in training)."),
        label_field: Optional[str] = Opt(None, help="Field holding the label (default: as in training)."),
        label_names: Optional[str] = Opt(None, help="Comma-separated names for integer labels."),
        device: Optional[str] = Opt(None, help="cpu | cuda | auto"),
        dtype: Optional[str] = Opt(None, help="float32 | bfloat16 | float16 | auto"),
        no_progress: bool = Opt(False, "--no-progress", help="No progress bars."),
    ) -> None:
        """Evaluate an adapter: eval loss, perplexity, conditioning accuracy (per label + confusion matrix),
        diversity, copying, latency; BLEU/chrF/ROUGE-L with --reference-field."""
        flags = dict(locals())  # first statement: locals() is exactly the flags here
        flags.pop("no_progress")
        if compose is not None:
            return _compose_eval(flags, no_progress)
        from prefixtune.eval.run_eval import EvalConfig, run_eval

        values = _given(flags, csv=("label_names", "guidance_sweep", "sweep_temperatures", "sweep_top_ps"))
        for key in ("guidance_sweep", "sweep_temperatures", "sweep_top_ps"):
            if key in values:
                values[key] = parse_floats(values[key], f"--{key.replace('_', '-')}")
        if no_progress:
            values["progress"] = False
        if "adapter" not in values:
            raise typer.BadParameter("pass --adapter NAME (or --compose A,B)", param_hint="--adapter")
        report = run_eval(EvalConfig(**values))
        if report.get("task"):  # a task adapter: reference scores per method
            for name, s in report["result"].items():
                typer.echo(f"{name}: BLEU {s['bleu']:.2f}, chrF {s['chrf']:.2f}, ROUGE-L {s['rouge_l']:.2f} "
                           f"({s['decoding']}, {s['items']} inputs)")
            return
        r = report["result"]
        cond = r.get("conditioning")
        typer.echo(f"eval loss {r['eval_loss']:.4f}, perplexity {r['perplexity']:.2f}"
                   + (f", conditioning accuracy {cond['accuracy']:.3f}" if cond else ""))

    @app.command("compare")
    @user_errors
    @_config_errors
    def compare_command(
        data: Optional[str] = Opt(None, help="Labelled data: hub id or local folder/file."),
        methods: Optional[str] = Opt(None, help="Comma-separated: prefix,lora,full,prompt (default "
                                                "prefix,lora,prompt; full = every weight trains)."),
        steps: Optional[int] = Opt(None, help="Optimizer steps for every trained method (default 50)."),
        out: Optional[str] = Opt(None, help="Output folder (default runs/compare)."),
        config: Optional[Path] = Opt(None, "--config", help="A previous run's config.json (or YAML/TOML): "
                                                            "re-run it; flags given here override it."),
        model: Optional[str] = Opt(None, help="Base model shared by all methods (default smollm2-135m)."),
        batch_size: Optional[int] = Opt(None, help="Rows per optimizer step (default 8)."),
        seed: Optional[int] = Opt(None, help="Seed for data order, init and sampling."),
        lr: Optional[float] = Opt(None, help="Peak learning rate for every trained method."),
        prefix_lr: Optional[float] = Opt(None, help="Learning rate for prefix tuning only."),
        lora_lr: Optional[float] = Opt(None, help="Learning rate for LoRA only."),
        full_lr: Optional[float] = Opt(None, help="Learning rate for full fine-tuning (default 5e-5)."),
        schedule: Optional[str] = Opt(None, help="cosine | linear | constant"),
        balance: Optional[bool] = Opt(None, "--balance/--no-balance", help="Equal training rows per label."),
        max_examples: Optional[int] = Opt(None, help="Cap on training rows."),
        max_length: Optional[int] = Opt(None, help="Tokens per example."),
        labels: Optional[str] = Opt(None, help="Only these labels (comma-separated)."),
        text_field: Optional[str] = Opt(None, help="Field holding the text."),
        label_field: Optional[str] = Opt(None, help="Field holding the label."),
        label_names: Optional[str] = Opt(None, help="Comma-separated names for integer labels."),
        template: Optional[str] = Opt(None, help="Training prompt with {label} (prefix and LoRA), or over row "
                                                 "fields ({meaning_representation}) for task data."),
        reference_field: Optional[str] = Opt(None, help="Task data: field with the references (default: the "
                                                        "text field)."),
        reference_rows: Optional[int] = Opt(None, help="Task data: distinct test inputs scored (default 100)."),
        num_beams: Optional[int] = Opt(None, help="Task data: beam search width (default 1 = greedy)."),
        num_virtual_tokens: Optional[int] = Opt(None, help="Prefix length (default 20)."),
        prefix_projection: Optional[bool] = Opt(None, "--prefix-projection/--no-prefix-projection",
                                                help="Train the prefix through the MLP."),
        per_label: Optional[bool] = Opt(None, "--per-label/--single", help="Prefix: one adapter per label."),
        init: Optional[str] = Opt(None, help="Prefix init: random | zero | text (as `prefixtune train`)."),
        init_text: Optional[str] = Opt(None, help="Prefix init text (--init text); {label} is filled in."),
        label_word_weight: Optional[float] = Opt(None, help="Per-label prefix: loss weight on each label's "
                                                            "distinctive words (the recipe's 10)."),
        encoder_hidden_size: Optional[int] = Opt(None, help="Prefix MLP width (default: the model's)."),
        lora_r: Optional[int] = Opt(None, help="LoRA rank (default 8)."),
        lora_alpha: Optional[int] = Opt(None, help="LoRA alpha (default 16)."),
        lora_targets: Optional[str] = Opt(None, help="LoRA target modules (default: attention projections)."),
        instruction: Optional[str] = Opt(None, help="Prompting baseline request with {label}."),
        guidance_scale: Optional[float] = Opt(None, help="Guide the prefix and LoRA samples against the base "
                                                         "model (1 = off, the default)."),
        split: Optional[str] = Opt(None, help="Split every method is evaluated on (default test)."),
        eval_examples: Optional[int] = Opt(None, help="Rows scored for eval loss (default 256)."),
        samples_per_label: Optional[int] = Opt(None, help="Generated samples per label (default 8)."),
        max_new_tokens: Optional[int] = Opt(None, help="Tokens per sample (default 40)."),
        latency_tokens: Optional[int] = Opt(None, help="Tokens per row when timing generation (default 32)."),
        latency_repeats: Optional[int] = Opt(None, help="Timed generation runs (default 3; 0 = skip)."),
        judge: Optional[str] = Opt(None, help="Custom judge as module:factory."),
        device: Optional[str] = Opt(None, help="cpu | cuda | auto"),
        dtype: Optional[str] = Opt(None, help="float32 | bfloat16 | float16 | auto"),
        isolate: Optional[bool] = Opt(None, "--isolate/--no-isolate",
                                      help="Train each method in its own process (honest peak memory)."),
        no_progress: bool = Opt(False, "--no-progress", help="No progress bars."),
    ) -> None:
        """Compare prefix tuning, LoRA, full fine-tuning and prompting: same data, steps, batches and seed; one
        table."""
        flags = dict(locals())  # first statement: locals() is exactly the flags here
        for key in ("config", "no_progress"):
            flags.pop(key)
        from prefixtune.eval.compare import CompareConfig, load_compare_config, run_compare, with_prefix_recipe

        values = load_compare_config(config) if config else {}
        values.update(_given(flags, csv=("methods", "labels", "label_names", "lora_targets")))
        values = with_prefix_recipe(values)
        if no_progress:
            values["progress"] = False
        results = run_compare(CompareConfig(**values))
        if results.get("task"):
            for row in results["methods"]:
                typer.echo(f"{row['method']:>7}: BLEU {row['bleu']:.2f}, chrF {row['chrf']:.2f}, ROUGE-L "
                           f"{row['rouge_l']:.2f}")
            return
        for row in results["methods"]:
            acc = row.get("conditioning_accuracy")
            typer.echo(f"{row['method']:>7}: eval loss {row['eval_loss']:.4f}"
                       + (f", conditioning accuracy {acc:.3f}" if acc is not None else ""))
