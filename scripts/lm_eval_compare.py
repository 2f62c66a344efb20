"""lm-evaluation-harness on a served adapter vs the harness's own transformers + PEFT (docs/BENCHMARKS.md).

    python scripts/lm_eval_compare.py --model ~/.cache/prefixtune/models/smollm2-135m --store STORE \
        --adapters NAME[,NAME] --per-label 20

Starts `prefixtune serve`, runs a multiple-choice emotion task (the log-likelihood of each of the six labels
after "Text: ...\\nEmotion:") through `local-completions` for the base model and each adapter, then through
`hf` (with `peft=` each adapter exported by the store), and prints accuracy, agreement and the largest gap.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from prefixtune.eval.harness import (choice_rows, hf_args, largest_gap, run_harness, served_args, serving,
                                     write_choice_task)
from prefixtune.store import AdapterStore

LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="base model folder (the harness's hf model loads it)")
    parser.add_argument("--store", required=True, help="adapter store served and exported from")
    parser.add_argument("--adapters", default="", help="comma-separated adapter names (the base model always runs)")
    parser.add_argument("--data", default="../shared/data/emotion/test.jsonl")
    parser.add_argument("--per-label", type=int, default=20, help="documents per label")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lm-eval-compare-"))
    task = write_choice_task(work / "task", choice_rows(args.data, LABELS, args.per_label), LABELS)
    names = ["base", *filter(None, args.adapters.split(","))]
    served, local, seconds = {}, {}, {}
    with serving(args.model, args.store, "--served-model-name", "base") as url:
        for name in names:
            start = time.perf_counter()
            served[name] = run_harness("local-completions", served_args(url, name, args.model), task)
            seconds[name] = [time.perf_counter() - start]
    for name in names:
        peft = None if name == "base" else AdapterStore(args.store).export(name, work / name, peft_only=True)
        start = time.perf_counter()
        local[name] = run_harness("hf", hf_args(args.model, peft), task)
        seconds[name].append(time.perf_counter() - start)
    print(f"{len(served[names[0]].answers)} documents, 6 choices each")
    print("| model | served acc | hf + peft acc | same answers | largest log-likelihood gap | served s | hf s |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        s, h = served[name], local[name]
        same = sum(a == b for a, b in zip(s.answers, h.answers))
        print(f"| {name} | {s.accuracy:.4f} | {h.accuracy:.4f} | {same}/{len(s.answers)} | {largest_gap(s, h):.1e} "
              f"| {seconds[name][0]:.0f} | {seconds[name][1]:.0f} |")


if __name__ == "__main__":
    main()
