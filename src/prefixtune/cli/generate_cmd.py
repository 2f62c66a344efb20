"""`prefixtune generate`: one prompt through one or more adapters, as one mixed batch.

Every --adapter (and --adapter-path) becomes one row of the same batch, so comparing adapters costs one
decode, and each row's output equals a run with that adapter alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from prefixtune.cli.common import parse_csv, parse_floats, user_errors
from prefixtune.cli.derive import Spec, config_flags

BASE = "none"  # --adapter none = the base model


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


# The sampling flags are SamplingParams fields; the rest of it (penalties, logit bias, ...) is the API's.
SAMPLING = Spec("prefixtune.engine.sampling:SamplingParams",
                only=("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "num_beams",
                      "length_penalty", "no_repeat_ngram_size", "early_stopping", "guidance_scale"),
                names={"max_new_tokens": ("--max-new-tokens", "-n"), "temperature": ("--temperature", "-t"),
                       "guidance_scale": ("--guidance-scale", "-g")},
                default_notes={"guidance_scale": "what the adapter recommends",
                               "seed": "a fresh stream; given, the same for every row"})
# How the model loads: the fields `prefixtune serve` shares with it.
LOAD = Spec("prefixtune.engine.core:EngineSpec", only=("device", "dtype", "force", "compile", "quantize"))


def register(app: typer.Typer) -> None:
    @app.command("generate")
    @user_errors
    @config_flags(SAMPLING, LOAD)
    def generate(
        prompt: str = typer.Option("", "--prompt", "-p", help="Text to continue (after the template with --label)."),
        adapter: list[str] = typer.Option(
            [], "--adapter", "-a", help="Adapter from the store; repeat for several (one row each). "
                                        "'none' = the base model. Default: none."),
        adapter_path: list[Path] = typer.Option(
            [], "--adapter-path", help="An adapter folder outside the store; repeatable."),
        model: str = typer.Option("smollm2-135m", "--model", "-m", help="Base model."),
        store: Optional[Path] = typer.Option(
            None, "--store", help="Adapter store folder (default: $PREFIXTUNE_HOME/adapters)."),
        label: Optional[str] = typer.Option(
            None, "--label", help="Fill each adapter's own training template with this label (a base-model "
                                  "row gets the first adapter's filled prompt, for comparison)."),
        stop: list[str] = typer.Option([], "--stop", help="Stop string (cut from the output); repeatable."),
        chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
        input_json: list[str] = typer.Option(
            [], "--input", "-i", help="A task adapter's input fields as JSON, e.g. '{\"meaning_representation\": "
                                      "\"name[The Eagle], food[French]\"}'; repeatable (one batch row each)."),
        input_file: Optional[Path] = typer.Option(
            None, "--input-file", help="A .jsonl file of input rows (other fields, e.g. references, are ignored)."),
        guidance_negative: Optional[str] = typer.Option(
            None, "--guidance-negative", help="The unconditioned row: an adapter such as a family's NAME-all, "
                                              "or 'none' for the base model (default: the adapter's choice)."),
        compose_mode: Optional[str] = typer.Option(
            None, "--compose-mode", help="A composed --adapter A+B: guidance (product of experts, each part against "
                                         "its own negative; default) or concat (the prefixes side by side)."),
        compose_weights: Optional[str] = typer.Option(
            None, "--compose-weights", help="A composed --adapter A+B: each part's guidance scale, comma-separated "
                                            "(default: what each part recommends)."),
        max_compose: int = typer.Option(4, "--max-compose", min=2, help="Most adapters in one composed --adapter."),
        num_samples: int = typer.Option(1, "--num-samples", help="Samples per row, seeded --seed, --seed+1, ..."),
        best_of: Optional[int] = typer.Option(
            None, "--best-of", help="A composed --adapter A+B (guidance): draw this many samples per row, print the "
                                    "--num-samples whose parts' evidence (score) is highest, best first."),
        as_json: bool = typer.Option(False, "--json", help="Print a JSON list, one object per adapter."),
        **given: Any,
    ) -> None:
        """Generate text with one or more adapters (one result per adapter, one mixed batch)."""
        # Everything a user can get wrong is checked before the (slow) model load.
        inputs = _input_rows(input_json, input_file)
        if not prompt and label is None and inputs is None:
            _fail("give --prompt, --label, or both (a task adapter: --input or --input-file)")
        names = list(adapter) or ([] if adapter_path else [BASE])
        sampling, load = SAMPLING.take(given), LOAD.take(given)
        sampling.update(stop=list(stop), chat=chat, guidance_negative=guidance_negative, num_samples=num_samples,
                        compose_mode=compose_mode, best_of=best_of)
        sampling["compose_weights"] = _check_request(names, adapter_path, store, sampling, compose_weights, max_compose)
        from prefixtune.engine.lm import PrefixLM
        from prefixtune.quantize import check_quantize

        lm = PrefixLM.load(model, store, **{**load, "quantize": check_quantize(load.get("quantize"))})
        lm.max_compose = max_compose
        rows: list[str | None] = [None if n.lower() == BASE else n for n in names]
        rows += [lm.register(str(folder), folder) for folder in adapter_path]
        _print(_generate(lm, prompt, rows, label, inputs, sampling), as_json, chat)


def _check_request(names: list[str], adapter_paths: list[Path], store: Optional[Path], sampling: dict[str, Any],
                   compose_weights: Optional[str], max_compose: int) -> list[float] | None:
    """Every request setting checked before the model loads; returns the --compose-weights as numbers."""
    from prefixtune.engine.compose import SEP, ComposeError, check_mode, parts_of
    from prefixtune.engine.sampling import SamplingParams
    from prefixtune.adapter_folder import validate_name
    from prefixtune.store import AdapterStore, default_store

    weights = parse_floats(parse_csv(compose_weights), "--compose-weights") if compose_weights else None
    try:
        check_mode(sampling["compose_mode"])
        parts = [p for n in names if n.lower() != BASE for p in (parts_of(n, max_compose) if SEP in n else [n])]
    except ComposeError as err:
        _fail(str(err))
    negative = sampling["guidance_negative"]
    for name in parts + ([negative] if negative is not None and negative.lower() != BASE else []):
        validate_name(name)
    for folder in adapter_paths:
        if not folder.is_dir():
            _fail(f"--adapter-path {folder} is not a folder")
    fields = {k: v for k, v in sampling.items() if k in SAMPLING.only}  # without the generate-only keys
    params = SamplingParams(**{**fields, "guidance_scale": fields.get("guidance_scale", 1.0)}, stop=sampling["stop"])
    try:
        params.validate()
        if params.num_beams != 1 or params.no_repeat_ngram_size:
            from prefixtune.engine.beam import check_beam_request

            check_beam_request(params.num_beams, params.max_new_tokens, params.length_penalty,
                               params.no_repeat_ngram_size, params.early_stopping, params.temperature, False,
                               min_p=params.min_p)
    except ValueError as err:
        _fail(str(err))
    if sampling["num_samples"] < 1:
        _fail("--num-samples must be >= 1")
    st = AdapterStore(store if store is not None else default_store())
    for name in parts:
        st.folder(name)  # a missing adapter names the ones that exist
    return weights


def _generate(lm, prompt: str, rows: list[str | None], label: Optional[str], inputs: list[dict] | None,
              sampling: dict[str, Any]) -> list[dict]:
    """One result dict per (input, adapter, sample), in batch order."""
    try:
        if inputs is None:
            prompts = _render_all(lm, prompt, rows, label)
        else:  # one batch row per (input, adapter)
            prompts = [p for values in inputs for p in _render_all(lm, prompt, rows, label, values)]
            rows = rows * len(inputs)
        results = lm.generate(prompts, rows, **sampling)
    except ValueError as err:
        from prefixtune.errors import user_error_types

        if isinstance(err, user_error_types()):
            raise  # user_errors prints it
        _fail(str(err))  # template/label/chat problems: the message says the fix
    num_samples = sampling["num_samples"]
    return [
        {
            "adapter": r.adapter if r.adapter is not None else BASE,
            "prompt": p,
            "text": r.text,
            "finish_reason": r.finish_reason,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "tokens": r.tokens,
            **({"input": inputs[i // num_samples // (len(rows) // len(inputs))]} if inputs is not None else {}),
            **({"score": r.score} if r.score is not None else {}),
        }
        for i, (p, r) in enumerate(zip([p for p in prompts for _ in range(num_samples)], results))
    ]


def _print(out: list[dict], as_json: bool, chat: bool) -> None:
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    for item in out:
        header = (f"── {item['adapter']} · {item['prompt_tokens']} prompt + {item['completion_tokens']} "
                  f"generated tokens · {item['finish_reason']} ──")
        typer.echo(typer.style(header, bold=True))
        # A completion continues its prompt; a chat answer is a new turn, so it starts a new line.
        typer.echo(typer.style(item["prompt"], dim=True) + ("\n" if chat else "") + item["text"])
        typer.echo()


def _input_rows(input_json: list[str], input_file: Optional[Path]) -> list[dict] | None:
    """--input objects and --input-file rows, in that order; None when neither was given."""
    from prefixtune.engine.task import read_input_rows

    rows = []
    for text in input_json:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            _fail(f"--input {text!r} is not valid JSON ({err.msg}); pass an object like '{{\"field\": \"value\"}}'")
        if not isinstance(value, dict):
            _fail(f"--input must be a JSON object of input fields, got {type(value).__name__}")
        rows.append(value)
    if input_file is not None:
        try:
            rows.extend(read_input_rows(input_file))
        except ValueError as err:
            _fail(str(err))
    return rows or None


def _render_all(lm, prompt: str, rows: list, label: str | None, inputs: dict | None = None) -> list[str]:
    """Each row's prompt; with --label or inputs, base-model rows see the first adapter's filled template."""
    rendered = [None if row is None else lm.render(prompt, row, label, inputs=inputs) for row in rows]
    if (label is not None or inputs is not None) and None in rows:
        reference = next((r for r in rendered if r is not None), None)
        if reference is None:
            raise ValueError("--label / --input fill an adapter's training template; the base model has none "
                             "(add an --adapter, or pass the whole --prompt)")
        return [reference if r is None else r for r in rendered]
    return [prompt if r is None else r for r in rendered]
