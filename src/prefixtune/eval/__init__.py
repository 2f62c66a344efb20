"""Evaluation: a judge for label-conditioned text, metrics, `prefixtune eval` and `prefixtune compare`.

Heavy modules (torch, transformers, sklearn) load on first use, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Judge": "prefixtune.eval.judge",
    "TfidfJudge": "prefixtune.eval.judge",
    "load_judge": "prefixtune.eval.judge",
    "EvalSettings": "prefixtune.eval.evaluate",
    "Method": "prefixtune.eval.evaluate",
    "evaluate_method": "prefixtune.eval.evaluate",
    "EvalConfig": "prefixtune.eval.run_eval",
    "run_eval": "prefixtune.eval.run_eval",
    "CompareConfig": "prefixtune.eval.compare",
    "run_compare": "prefixtune.eval.compare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prefixtune.eval' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
