"""The beam-search extension fields of /v1/completions and /v1/chat/completions, checked strictly.

`{"num_beams": 4, "n": 2, "length_penalty": 0.8, "no_repeat_ngram_size": 3, "early_stopping": true}` runs
each prompt as one group of num_beams rows in the continuous batch (engine/sampler.py) and returns its n
best beams as choices, best first. Beam search is deterministic: sampling settings are refused, not ignored
(a seed is accepted and changes nothing). With `stream`, each choice arrives whole when the search ends:
beams are only ranked then, so there is nothing correct to send earlier.
"""

from __future__ import annotations

from typing import Any

from prefixtune.server.protocol import APIError

BEAM_ONLY = ("length_penalty", "no_repeat_ngram_size", "early_stopping")


def beam_fields(body, max_num_beams: int, max_batch: int) -> dict[str, Any] | None:
    """SamplingParams fields of a beam request (None: it samples as usual); a 400 naming the field otherwise."""
    if body.num_beams == 1:
        given = next((name for name in BEAM_ONLY if getattr(body, name) is not None), None)
        if given is not None:
            raise APIError(400, f"{given} applies to beam search; add num_beams >= 2 or drop {given}", param=given)
        return None
    for limit, setting in ((max_num_beams, "max_num_beams"), (max_batch, "max_batch (each beam is a batch row)")):
        if body.num_beams > limit:
            raise APIError(400, f"num_beams={body.num_beams}; this server's limit {setting} is {limit}",
                           param="num_beams", code="limit_exceeded")
    if body.n > body.num_beams:
        raise APIError(400, f"n={body.n} but num_beams={body.num_beams}: beam search returns at most num_beams "
                            "beams; lower n or raise num_beams", param="n")
    fix = "beam search is deterministic; drop it, or sample with num_beams 1"
    for name, neutral in (("temperature", (None, 0)), ("top_p", (None, 1)), ("top_k", (None, 0, -1)),
                          ("min_p", (None, 0)),
                          ("ignore_eos", (False,)), ("guidance_scale", (None, 1)), ("guidance_negative", (None,))):
        if getattr(body, name) not in neutral:
            raise APIError(400, f"{name}={getattr(body, name)!r} with num_beams={body.num_beams}: {fix}", param=name)
    return dict(num_beams=body.num_beams, num_return_sequences=body.n, temperature=0.0,
                length_penalty=1.0 if body.length_penalty is None else body.length_penalty,
                no_repeat_ngram_size=body.no_repeat_ngram_size or 0, early_stopping=bool(body.early_stopping))
