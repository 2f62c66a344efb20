"""Train one compare method from a spec file: `python -m prefixtune.eval.worker SPEC.json`.

A separate process gives each method its own memory high-water mark. The result (summary, adapter folders,
loss history) is written to the spec's `result` path; a failure leaves its traceback in error.txt beside it.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from prefixtune.fileio import atomic_write_text


def _history(run: Path) -> list[dict[str, Any]]:
    log = run / "train_log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on Windows
        return float("nan")


def run_training(spec: dict[str, Any], loaded=None, data=None, say=print) -> dict[str, Any]:
    """Train spec["method"] ("prefix", "lora" or "full") with spec["train"] (TrainConfig fields)."""
    from prefixtune.train.config import TrainConfig

    import torch

    cfg = TrainConfig(**spec["train"])
    load_before = _load_average()
    if torch.cuda.is_available():  # in-process runs share the device: count this method's peak only
        torch.cuda.reset_peak_memory_stats()
    if spec["method"] not in ("prefix", "lora", "full"):
        raise ValueError(f"unknown method {spec['method']!r}")
    from prefixtune.train.run import train

    cfg.method = spec["method"]
    result = train(cfg, loaded, data, say)  # one engine: LoRA and full fine-tuning get prefix tuning's loop
    if result.interrupted:
        raise RuntimeError(f"{spec['method']} training was interrupted")
    adapters = {name: str(folder) for name, folder in result.adapters.items()}
    summary = result.summary
    # Other processes on the machine slow training down; the load average lets readers judge the timings.
    summary["load average"] = max(load_before, _load_average())
    out = {"method": spec["method"], "summary": summary, "adapters": adapters, "history": _history(Path(cfg.out))}
    if spec.get("result"):
        atomic_write_text(Path(spec["result"]), json.dumps(out, indent=2, default=str))
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m prefixtune.eval.worker SPEC.json", file=sys.stderr)
        return 2
    spec_path = Path(argv[1])
    error = spec_path.parent / "error.txt"
    error.unlink(missing_ok=True)
    try:
        run_training(json.loads(spec_path.read_text()))
    except BaseException as err:  # KeyboardInterrupt too: the parent reports whatever stopped the child
        atomic_write_text(error, "".join(traceback.format_exception(err)) + f"{type(err).__name__}: {err}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
