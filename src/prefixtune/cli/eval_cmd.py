"""`prefixtune eval` and `prefixtune compare`: flags derived from EvalConfig (and ComposeEvalConfig) and
CompareConfig."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from prefixtune.cli.common import user_errors
from prefixtune.cli.derive import Spec, config_flags
from prefixtune.cli.train_cmd import PER_LABEL

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


# Settings `prefixtune eval` leaves at their defaults, each with why it has no flag.
EVAL_CONFIG_ONLY = {
    "max_length": "scoring length follows the adapter's training",
    "real_stats": "the real-text columns of the report, always on from the CLI",
}
COMPARE_CONFIG_FILE_ONLY = dict.fromkeys(("temperature", "top_p", "min_p", "eval_batch_size", "guidance_negative",
                            "guidance_sweep", "real_stats", "weight_decay", "warmup_ratio", "grad_clip",
                            "lora_dropout", "chat"),
                                          "a detail every method shares; a --config file may set it")
EVAL = Spec("prefixtune.eval.run_eval:EvalConfig", exclude=EVAL_CONFIG_ONLY,
            names={"eval_batch_size": ("--batch-size",)})
# `eval --compose A,B`: ComposeEvalConfig's own fields, named after --compose where EvalConfig has the name.
COMPOSE_CONFIG = "prefixtune.eval.compose:ComposeEvalConfig"
COMPOSE = (Spec(COMPOSE_CONFIG, only=("families",), params={"families": "compose"}),
           Spec(COMPOSE_CONFIG, only=("data", "methods", "weights", "best_of", "instruction"),
                help_prefix="--compose: ",
                params={"data": "compose_data", "methods": "compose_methods", "weights": "compose_weights"}))
COMPARE = Spec("prefixtune.eval.compare_setup:CompareConfig", exclude=COMPARE_CONFIG_FILE_ONLY, names=PER_LABEL)
COMPOSE_ONLY = {"compose", "compose_data", "compose_methods", "compose_weights", "best_of", "instruction"}


def _compose_eval(values: dict[str, Any]) -> None:
    """`eval --compose A,B`: the single-adapter flags that do not apply are refused by name."""
    from prefixtune.eval.compose import ComposeEvalConfig, run_compose_eval

    allowed = {f for f in ComposeEvalConfig.__dataclass_fields__} | COMPOSE_ONLY
    extra = sorted(k for k in values if k not in allowed or k == "data")
    if extra:
        raise typer.BadParameter(f"not used with --compose: {', '.join('--' + k.replace('_', '-') for k in extra)}",
                                 param_hint="--compose")
    values["families"] = values.pop("compose")
    for old, new in (("compose_data", "data"), ("compose_methods", "methods"), ("compose_weights", "weights")):
        if old in values:
            values[new] = values.pop(old)
    report = run_compose_eval(ComposeEvalConfig(**values))
    for name, r in report["results"].items():
        aspects = ", ".join(f"{f} {a:.2f}" for f, a in r["aspects"].items())
        typer.echo(f"{name}: joint {r['joint']:.2f} ({aspects}), {r['mean_words']:.1f} words, distinct-2 "
                   f"{r['distinct_2']:.2f}, degenerate {r['degenerate']:.0%}")


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @user_errors
    @_config_errors
    @config_flags(EVAL, *COMPOSE)
    def eval_command(**given: Any) -> None:
        """Evaluate an adapter: eval loss, perplexity, conditioning accuracy (per label + confusion matrix),
        diversity, copying, latency; BLEU/chrF/ROUGE-L with --reference-field."""
        if "compose" in given:
            return _compose_eval(given)
        from prefixtune.eval.run_eval import EvalConfig, run_eval

        if "adapter" not in given:
            raise typer.BadParameter("pass --adapter NAME (or --compose A,B)", param_hint="--adapter")
        report = run_eval(EvalConfig(**given))
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
    @config_flags(COMPARE)
    def compare_command(
        config: Optional[Path] = Opt(None, "--config", help="A previous run's config.json (or YAML/TOML): "
                                                            "re-run it; flags given here override it."),
        **given: Any,
    ) -> None:
        """Compare prefix tuning, LoRA, full fine-tuning and prompting: same data, steps, batches and seed; one
        table."""
        from prefixtune.eval.compare import CompareConfig, load_compare_config, run_compare, with_prefix_recipe

        values = with_prefix_recipe({**(load_compare_config(config) if config else {}), **given})
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
