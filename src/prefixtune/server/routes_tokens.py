"""POST /tokenize and /detokenize, in vLLM's shapes (the base model's tokenizer: adapters share it)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from prefixtune.server import protocol as P
from prefixtune.server import schemas as S
from prefixtune.server.logprobs import token_strings
from prefixtune.server.protocol import APIError
from prefixtune.server.routes_generate import chat_ids
from prefixtune.server.state import AppState, app_state

tokens_router = APIRouter()


@tokens_router.post("/tokenize", responses=S.TOKENIZE)
async def tokenize(body: P.TokenizeRequest, state: AppState = Depends(app_state)):
    if body.model is not None:
        await state.registry.resolve(body.model)  # 404 for a model this server does not serve
    if body.messages is not None:
        special = bool(body.add_special_tokens)  # vLLM: off for chat (the template holds its own)
        ids = await chat_ids(state, body.messages, body.add_generation_prompt, special)
    else:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await state.encode(body.prompt, special=special)
    strings = None
    if body.return_token_strs:
        found = await state.on_text_thread(token_strings, state.tokenizer, set(ids))
        strings = [found[i] for i in ids]
    return {"count": len(ids), "max_model_len": state.max_len, "tokens": ids, "token_strs": strings}


@tokens_router.post("/detokenize", responses=S.DETOKENIZE)
async def detokenize(body: P.DetokenizeRequest, state: AppState = Depends(app_state)):
    if body.model is not None:
        await state.registry.resolve(body.model)
    vocab = len(state.tokenizer)
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(400, f"token ids must lie in [0, {vocab})", param="tokens")
    return {"prompt": await state.on_text_thread(state.tokenizer.decode, body.tokens)}
