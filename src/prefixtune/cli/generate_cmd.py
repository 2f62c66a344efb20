"""`prefixtune generate`: one prompt through one or more adapters, as one mixed batch.

Every --adapter (and --adapter-path) becomes one row of the same batch, so comparing adapters costs one
decode, and each row's output equals a run with that adapter alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from prefixtune.cli.common import parse_csv, parse_floats, user_errors

BASE = "none"  # --adapter none = the base model


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    @app.command("generate")
    @user_errors
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
        max_new_tokens: int = typer.Option(40, "--max-new-tokens", "-n", help="Tokens to generate at most."),
        temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
        top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
        top_k: int = typer.Option(0, "--top-k", help="Sample among the k likeliest tokens (0 = all)."),
        min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens under this fraction of the likeliest "
                                                         "token's probability (0 = off; 0.05-0.1 is typical)."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Fix the sampling stream (same for every row)."),
        stop: list[str] = typer.Option([], "--stop", help="Stop string (cut from the output); repeatable."),
        chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
        input_json: list[str] = typer.Option(
            [], "--input", "-i", help="A task adapter's input fields as JSON, e.g. '{\"meaning_representation\": "
                                      "\"name[The Eagle], food[French]\"}'; repeatable (one batch row each)."),
        input_file: Optional[Path] = typer.Option(
            None, "--input-file", help="A .jsonl file of input rows (other fields, e.g. references, are ignored)."),
        num_beams: int = typer.Option(1, "--num-beams", help="Beam search with this many beams (1 = greedy/sampling)."),
        length_penalty: float = typer.Option(1.0, "--length-penalty", help="Beam score = log-prob / length ** this."),
        no_repeat_ngram_size: int = typer.Option(0, "--no-repeat-ngram-size",
                                                 help="Beam search: never repeat an n-gram of this size (0 = off)."),
        early_stopping: bool = typer.Option(False, "--early-stopping",
                                            help="Beam search: stop once num_beams hypotheses are finished."),
        guidance_scale: Optional[float] = typer.Option(
            None, "--guidance-scale", "-g", help="Sharpen each adapter against an unconditioned row (1 = off; "
                                                 "default: what the adapter recommends)."),
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
        force: bool = typer.Option(False, "--force", help="Use adapters trained on another base model "
                                                          "(only when the shapes match)."),
        as_json: bool = typer.Option(False, "--json", help="Print a JSON list, one object per adapter."),
        device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N"),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="auto | float32 | bfloat16 | float16"),
        compile: bool = typer.Option(False, "--compile/--no-compile",
                                     help="Compile the decode step (torch.compile; pays off over long outputs)."),
        quantize: Optional[str] = typer.Option(None, "--quantize", help="fp16 | int8: quantized frozen base, CPU (fp16: no drift; int8: faster, drifts; docs/BENCHMARKS.md)."),
    ) -> None:
        """Generate text with one or more adapters (one result per adapter, one mixed batch)."""
        from prefixtune.engine.sampling import SamplingParams
        from prefixtune.store import AdapterStore, default_store, validate_name

        # Everything a user can get wrong is checked before the (slow) model load.
        inputs = _input_rows(input_json, input_file)
        if not prompt and label is None and inputs is None:
            _fail("give --prompt, --label, or both (a task adapter: --input or --input-file)")
        from prefixtune.engine.compose import SEP, ComposeError, check_mode, parts_of

        names = list(adapter) or ([] if adapter_path else [BASE])
        weights = parse_floats(parse_csv(compose_weights), "--compose-weights") if compose_weights else None
        try:
            check_mode(compose_mode)
            parts = [p for n in names if n.lower() != BASE for p in (parts_of(n, max_compose) if SEP in n else [n])]
        except ComposeError as err:
            _fail(str(err))
        for name in parts:
            validate_name(name)
        for folder in adapter_path:
            if not folder.is_dir():
                _fail(f"--adapter-path {folder} is not a folder")
        try:
            SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, list(stop),
                           guidance_scale=1.0 if guidance_scale is None else guidance_scale, min_p=min_p).validate()
            if num_beams != 1 or no_repeat_ngram_size:
                from prefixtune.engine.beam import check_beam_request

                check_beam_request(num_beams, max_new_tokens, length_penalty, no_repeat_ngram_size, early_stopping,
                                   temperature, False, min_p=min_p)
        except ValueError as err:
            _fail(str(err))
        if num_samples < 1:
            _fail("--num-samples must be >= 1")
        if guidance_negative is not None and guidance_negative.lower() != BASE:
            validate_name(guidance_negative)
        st = AdapterStore(store if store is not None else default_store())
        for name in parts:
            st.folder(name)  # a missing adapter names the ones that exist

        from prefixtune.engine.lm import PrefixLM

        from prefixtune.quantize import check_quantize

        lm = PrefixLM.load(model, st, device=device, dtype=dtype, force=force, compile=compile,
                           quantize=check_quantize(quantize))
        lm.max_compose = max_compose
        rows: list[str | None] = [None if n.lower() == BASE else n for n in names]
        rows += [lm.register(str(folder), folder) for folder in adapter_path]
        try:
            if inputs is None:
                prompts = _render_all(lm, prompt, rows, label)
            else:  # one batch row per (input, adapter)
                prompts = [p for values in inputs for p in _render_all(lm, prompt, rows, label, values)]
                rows = rows * len(inputs)
            results = lm.generate(prompts, rows, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, stop=list(stop), chat=chat,
                                  guidance_scale=guidance_scale, guidance_negative=guidance_negative,
                                  num_samples=num_samples, num_beams=num_beams, length_penalty=length_penalty,
                                  no_repeat_ngram_size=no_repeat_ngram_size, early_stopping=early_stopping,
                                  compose_mode=compose_mode, compose_weights=weights)
        except ValueError as err:
            from prefixtune.errors import user_error_types

            if isinstance(err, user_error_types()):
                raise  # user_errors prints it
            _fail(str(err))  # template/label/chat problems: the message says the fix
        out = [
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
