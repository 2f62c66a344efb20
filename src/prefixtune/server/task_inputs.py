"""The `inputs` extension of /v1/completions: a task adapter's template filled from a row of fields.

`{"model": "e2e", "prompt": "", "inputs": {"meaning_representation": "name[The Eagle], food[French]"}}`
gives the prompt the adapter was trained on (template filled, then `prompt` after it, as `generate --input`).
"""

from __future__ import annotations

from typing import Any

from prefixtune.engine.task import render_task
from prefixtune.server.protocol import APIError


def task_prompts(registry, model: str, inputs: dict[str, Any], prompts: list) -> list[str]:
    """Each prompt after the served adapter's filled template; 400 naming the fields on any mismatch. Blocking."""
    adapter = registry.lookup(model)  # the caller resolved it on the event loop (404s there)
    if adapter is None:
        raise APIError(400, "inputs fill a task adapter's training template; the base model has none. Fix: use "
                            "an adapter trained with a template over row fields as model", param="inputs")
    try:
        with registry.lock:
            manifest = registry.lm.manifest(adapter)
        out = []
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise APIError(400, "with inputs, prompt must be text (it follows the filled template; \"\" for "
                                    "none)", param="prompt")
            out.append(render_task(manifest, adapter, inputs, None, prompt))
        return out
    except ValueError as err:
        raise APIError(400, str(err), param="inputs") from err
