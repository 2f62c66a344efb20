"""Helpers shared by the evaluation tests (a uniquely named module: `conftest` is taken by tests/)."""

from __future__ import annotations

import json
import random
from pathlib import Path

# Each label has its own words, so the TF-IDF judge is right on every real test text (accuracy 1.0) and
# any conditioning miss in the tests comes from the (random) tiny model, not from the judge.
WORDS = {"joy": ["happy", "glad", "delighted", "cheerful"], "anger": ["angry", "furious", "mad", "annoyed"],
         "fear": ["scared", "afraid", "terrified", "nervous"]}
LABELS = sorted(WORDS)
_FILL = ["today", "about work", "at home", "with my friends", "this morning", "again", "right now"]


def write_data(root: Path, sizes=(("train", 60), ("validation", 12), ("test", 12)), seed: int = 0,
               reference: bool = False) -> Path:
    """train/validation/test jsonl of 'i feel so <word> <filler>' with labels cycling through LABELS."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in sizes:
        with (root / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                label = LABELS[i % len(LABELS)]
                word = rng.choice(WORDS[label])
                row = {"text": f"i feel so {word} {rng.choice(_FILL)}", "label": label}
                if reference:
                    row["ref"] = f"i am {word}"
                f.write(json.dumps(row) + "\n")
    return root


def run_cli(args: list[str]):
    """Run the real `prefixtune` CLI in-process; returns typer's Result (exit_code, output)."""
    from typer.testing import CliRunner

    from prefixtune.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])
