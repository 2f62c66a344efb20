"""A composed model ("emotion-joy+agnews-sports") in a request: its name checked, its rows prepared.

Each part must be a served adapter (404 naming the part otherwise), at most `--max-compose` parts (400), never
the base model's id. `compose_mode` picks the product of experts ("guidance", the default) or one row with the
parts' prefixes side by side ("concat", which then runs as any adapter does); `compose_weights` are the parts'
guidance scales, in the name's order (engine/compose.py).
"""

from __future__ import annotations

from prefixtune.adapter_folder import ManifestError
from prefixtune.engine.compose import (ComposeError, Experts, build_experts, check_best_of, composed_names, is_composed,
                                       parts_of)
from prefixtune.errors import user_error_types
from prefixtune.prefix.peft_io import AdapterFormatError
from prefixtune.server.protocol import APIError


def check_composed(model: str, limit: int, base_ids: set[str]) -> list[str]:
    """The parts of `model`; 400 for a malformed name, too many parts or the base model as a part."""
    try:
        parts = parts_of(model, limit)
    except ComposeError as err:
        code = "limit_exceeded" if "max_compose" in str(err) else "invalid_composition"
        raise APIError(400, str(err), param="model", code=code) from err
    for part in parts:
        if part in base_ids:
            raise APIError(400, f"composed model {model!r}: {part!r} is the base model, which every part already "
                                "runs on; compose adapters only", param="model", code="invalid_composition")
    return parts


def samples_per_prompt(body) -> int:
    """Samples per prompt of a completions request: n, or best_of where a composed model ranks them; 400 else."""
    if body.best_of is None or body.best_of == body.n:
        return body.n
    if body.best_of < body.n:
        raise APIError(400, f"best_of ({body.best_of}) must be >= n ({body.n})", param="best_of")
    if body.stream:
        raise APIError(400, "best_of cannot be used with stream (the best are known only when all are done)",
                       param="best_of")
    try:
        check_best_of([body.model], body.compose_mode)
    except ComposeError as err:
        raise APIError(400, str(err), param=err.param) from err
    return body.best_of


def prepare_composed(registry, adapter: str | None, scale: float | None, negative: str | None, mode: str | None,
                     weights: list[float] | None, beams: bool) -> Experts | None:
    """The product of experts of a composed request (rows' prefixes read here, off the event loop), or None when
    the request runs as one row (not composed, or compose_mode "concat")."""
    if not is_composed(adapter):
        field = "compose_mode" if mode is not None else "compose_weights"
        raise APIError(400, f"{field} applies to a composed model (model: \"a+b\"); {adapter or 'the base model'!r} "
                            "is a single model", param=field)
    try:  # the mode, weights against it and beams against guidance: the engine's checks (engine/compose.py)
        composed_names([adapter], mode, None, beam=beams, weights=weights)
    except ComposeError as err:
        raise APIError(400, str(err), param=err.param) from err
    if mode == "concat":
        return None
    if negative is not None and negative.lower() != "none" and negative not in registry.base_ids:
        served = set(registry.names())
        unknown = [p for p in (parts_of(negative, None) if is_composed(negative) else [negative]) if p not in served]
        if unknown:
            raise APIError(400, f"guidance_negative {unknown[0]!r} is not a served adapter (an adapter name, or "
                                "\"none\" for the base model)", param="guidance_negative", code="model_not_found")
    negative = "none" if negative in registry.base_ids else negative
    try:
        with registry.lock:
            return build_experts(registry.lm, adapter, weights, scale, negative)
    except (AdapterFormatError, ManifestError) as err:
        raise APIError(500, f"an adapter of {adapter!r} is damaged on the server: {err}", "server_error",
                       param="model", code="adapter_damaged") from err
    except ComposeError as err:
        raise APIError(400, str(err), param=err.param) from err
    except user_error_types() as err:
        raise APIError(400, f"composed model {adapter!r} cannot be used: {err}", param="model",
                       code="adapter_incompatible") from err
    except ValueError as err:
        raise APIError(400, str(err), param="guidance_negative" if "negative" in str(err) else "guidance_scale") \
            from err
