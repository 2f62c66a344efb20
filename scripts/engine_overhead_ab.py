"""The engine's own cost in two source trees, alternated in one run (docs/BENCHMARKS.md): is a change free?

    python scripts/engine_overhead_ab.py --before /work/main/src --after src --rounds 4

Each round runs, per tree, a fresh process with PYTHONPATH=TREE: the tiny model, then 5 runs of a bare
transformers greedy loop (prefixtune.bench.engine_overhead) and of the engine in that process, timed by this
script for both trees (batch 16, 64 new tokens, 1 torch thread), keeping the best wall tokens/s and the least
CPU seconds (all threads) per 1000 tokens.
On a shared machine the CPU time moves far less than the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _engine_tokens_per_s(lm, prompt_ids: list[int], batch: int, new_tokens: int) -> float:
    """Timed here, not by the tree's own bench code, so both trees are measured alike: the scheduler is started
    before the clock (a server starts it once), then all rows are submitted at once, greedy, EOS ignored."""
    import threading

    from prefixtune.engine.sampling import SamplingParams
    from prefixtune.engine.scheduler import Request, Scheduler

    scheduler, done = Scheduler(lm, max_batch=batch, max_queue=batch, start=False), threading.Semaphore(0)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    scheduler.start()
    start = time.perf_counter()
    scheduler.submit_many([Request(list(prompt_ids), None, params, lambda out: out.finish_reason and done.release())
                           for _ in range(batch)])
    for _ in range(batch):
        done.acquire(timeout=300)
    elapsed = time.perf_counter() - start
    scheduler.shutdown(timeout=1.0, drain=False)
    return batch * new_tokens / elapsed


def child(model_dir: str) -> None:
    import torch

    torch.set_num_threads(1)
    from prefixtune.bench.engine_overhead import bare_loop_tokens_per_s
    from prefixtune.engine.lm import PrefixLM
    from prefixtune.models import load_base_model

    lm = PrefixLM(load_base_model(model_dir, device="cpu", dtype="float32"), tempfile.mkdtemp())
    prompt = lm.tokenizer("Once upon a time there was").input_ids
    wall, bare, cpu = 0.0, 0.0, float("inf")
    for _ in range(5):
        bare = max(bare, bare_loop_tokens_per_s(lm.model, prompt, 16, 64))
        start = time.process_time()
        wall = max(wall, _engine_tokens_per_s(lm, prompt, 16, 64))
        cpu = min(cpu, (time.process_time() - start) / (16 * 64) * 1000)
    print("RESULT", json.dumps({"tokens/s": wall, "bare tokens/s": bare, "CPU s per 1000 tokens": cpu}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="source folder of the baseline (its src/)")
    parser.add_argument("--after", required=True, help="source folder of the change")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    model_dir = tempfile.mkdtemp()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.abspath(args.after)}
    subprocess.run([sys.executable, "-c", f"from prefixtune.testing import save_tiny_model; "
                    f"save_tiny_model({model_dir!r})"], env=env, check=True, capture_output=True)
    rounds: dict[str, list[dict]] = {"before": [], "after": []}
    for i in range(args.rounds):  # alternating: a burst of load elsewhere hits both trees alike
        for name in rounds:
            env["PYTHONPATH"] = os.path.abspath(getattr(args, name))
            out = subprocess.run([sys.executable, __file__, "--child", model_dir], env=env, capture_output=True,
                                 text=True, check=True).stdout
            rounds[name].append(json.loads(out.split("RESULT ", 1)[1]))
            print(i, name, rounds[name][-1], flush=True)
    best = {name: (min(r["CPU s per 1000 tokens"] for r in rs), max(r["tokens/s"] for r in rs),
                   max(r["tokens/s"] / r["bare tokens/s"] for r in rs)) for name, rs in rounds.items()}
    for name, (cpu, wall, ratio) in best.items():
        print(f"{name}: best CPU s per 1000 tokens {cpu:.3f}, best tokens/s {wall:.0f}, best engine/bare {ratio:.2f}")
    print(f"after / before: {best['before'][0] / best['after'][0]:.3f}x by CPU time, "
          f"{best['after'][1] / best['before'][1]:.3f}x by wall time")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2])
    else:
        main()
