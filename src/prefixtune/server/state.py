"""The state every route shares (`AppState`), and the work a generation request does before it streams:
limits, adapter resolution off the event loop, tokenizing on the text thread, rows into the engine."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HTTPRequest

from prefixtune.engine.admission import cost
from prefixtune.engine.generation import candidate_seeds
from prefixtune.engine.sampling import SamplingParams
from prefixtune.engine.scheduler import Scheduler
from prefixtune.server import protocol as P
from prefixtune.server.adapters import AdapterRegistry
from prefixtune.server.beams import beam_fields
from prefixtune.server.controls import control_fields, has_grammar
from prefixtune.server.jobs import Job
from prefixtune.server.logprobs import check_beams
from prefixtune.server.metrics import ServerMetrics
from prefixtune.server.model_cards import CardInfo
from prefixtune.server.protocol import APIError


@dataclass
class ServerSettings:
    """HTTP-side policy (batch and queue limits live on the Scheduler)."""

    model_name: str  # the base model's id in /v1/models and in requests
    host: str = "127.0.0.1"  # interface to listen on (loopback unless asked otherwise)
    port: int = 8000  # port to listen on (0 = any free port)
    api_key: str | None = None  # required as `Authorization: Bearer` on every endpoint but /health
    admin: bool = True  # serve POST /v1/adapters and DELETE /v1/adapters/{name}
    adapter_roots: list[Path] = field(default_factory=list)  # folders adapters may be loaded from by path
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_model_len: int | None = None  # virtual + prompt + new tokens per row; None = the model's limit
    max_tokens: int = 1024  # cap on max_tokens per choice
    # Per-request limits (each refused with a 400 naming it): every one bounds work a single request can cause.
    max_prompt_tokens: int | None = None  # tokens per prompt; None = max_model_len
    max_n: int = 16  # choices per prompt (each is a batch row)
    max_num_beams: int = 8  # beams per prompt (each is a batch row; server/beams.py)
    max_compose: int = 4  # adapters in a composed model "a+b+..." (each part and negative is a batch row)
    max_stop_strings: int = 4  # OpenAI's limit
    max_stop_chars: int = 256  # characters per stop string (matching cost per token grows with it)
    shutdown_timeout: float = 10.0  # seconds in-flight requests get to finish on shutdown
    docs: bool = True  # GET /openapi.json and /docs (the API described; --no-docs turns them off)


def model_limit(model) -> int | None:
    from prefixtune.models import max_positions

    return max_positions(model.config)


def _refuse(param: str, message: str) -> None:
    raise APIError(400, message, param=param, code="limit_exceeded")


@dataclass
class AppState:
    """One server's engine, adapters, metrics and limits; routes reach it as `request.app.state.prefixtune`."""

    lm: object  # PrefixLM (or the engine process's shell of it)
    scheduler: Scheduler  # the engine's interface: submit, cancel, counters
    settings: ServerSettings
    registry: AdapterRegistry
    metrics: ServerMetrics
    max_len: int  # virtual + prompt + new tokens per row
    # Tokenizing a 1 MB prompt takes a while: it runs on one dedicated thread (a fast tokenizer must not be
    # used by two threads at once), so the event loop keeps serving streams meanwhile.
    text_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="prefixtune-tokenize"))
    cards: CardInfo | None = None  # /v1/models' extension field (server/model_cards.py)

    def __post_init__(self) -> None:
        self.cards = self.cards or CardInfo(self.lm)

    @property
    def tokenizer(self):
        return self.lm.tokenizer  # the text thread only (the engine decodes with its own copy)

    async def on_text_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.text_pool, fn, *args)

    def _encode(self, text: str, special: bool = True) -> list[int]:
        # As PrefixLM.generate encodes, so greedy outputs match offline ones: a chat template already
        # holds its special tokens (special=False), a plain prompt gets the tokenizer's usual ones.
        return list(self.tokenizer(text, add_special_tokens=special).input_ids)

    async def encode(self, text: str, special: bool = True, param: str = "prompt") -> list[int]:
        try:
            text.encode("utf-8")  # fields are checked on parsing; text built from them (task inputs) here
        except UnicodeEncodeError:
            raise APIError(400, "the text holds a lone UTF-16 surrogate (invalid Unicode); send valid UTF-8 text",
                           param=param) from None
        return await self.on_text_thread(self._encode, text, special)

    def check_limits(self, body: P.SamplingBody, prompts: list[list[int]], prompt_field: str, per: int) -> None:
        s = self.settings
        stops = body.stop or []
        if len(stops) > s.max_stop_strings:
            _refuse("stop", f"{len(stops)} stop strings; this server's limit max_stop_strings is "
                            f"{s.max_stop_strings}")
        longest = max(map(len, stops), default=0)
        if longest > s.max_stop_chars:
            _refuse("stop", f"a stop string of {longest} characters; this server's limit max_stop_chars is "
                            f"{s.max_stop_chars}")
        if per > s.max_n:
            field = "n" if per == body.n else "best_of"
            _refuse(field, f"{field}={per}; this server's limit max_n is {s.max_n}")
        limit = s.max_prompt_tokens or self.max_len
        for p, ids in enumerate(prompts):
            if len(ids) > limit:
                _refuse(prompt_field, f"prompt {p} has {len(ids)} tokens; this server's limit max_prompt_tokens "
                                      f"is {limit}")
        if per * len(prompts) > self.scheduler.max_queue:
            _refuse("n", f"n x prompts = {per * len(prompts)} rows exceed this server's max_queue "
                         f"{self.scheduler.max_queue}")

    def _room(self, p: int, ids: list[int], virtual: int, max_tokens: int | None, prompt_field: str) -> int:
        """Tokens row p may generate; 400 when its prompt (or max_tokens) does not fit max_model_len."""
        room = self.max_len - virtual - len(ids)
        if room < (0 if max_tokens == 0 else 1):  # max_tokens 0: a scoring request (echo) generates nothing
            raise APIError(400, f"prompt {p} has {len(ids)} tokens (+{virtual} virtual); max_model_len is "
                           f"{self.max_len}", param=prompt_field, code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens} + {len(ids)} prompt + {virtual} virtual tokens "
                           f"exceed max_model_len {self.max_len}", param="max_tokens",
                           code="context_length_exceeded")
        return room

    def _add_rows(self, job: Job, body: P.SamplingBody, p: int, ids: list[int], adapter, prep, new: int,
                  beams: dict | None, controls: dict, per: int) -> None:
        if beams is not None:  # one request: a group of num_beams rows whose n best beams are the choices
            job.add(ids, adapter, prep.prefix, SamplingParams(max_new_tokens=new, stop=list(body.stop or []),
                                                              **beams))
            return
        base = None if body.seed is None else body.seed + p * per
        for seed in candidate_seeds(base, body.n, per):  # n samples, or best_of of which the caller keeps n
            params = SamplingParams(
                max_new_tokens=new, temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=max(body.top_k or 0, 0),
                min_p=body.min_p or 0.0, seed=seed,
                stop=list(body.stop or []), ignore_eos=body.ignore_eos, guidance_scale=prep.guidance_scale,
                logprobs=body.token_logprobs(), prompt_logprobs=body.prompt_logprobs(), **controls)
            job.add(ids, adapter, prep.prefix, params, prep.negative, prep.negative_prefix, prep.experts)

    async def start_job(self, http: HTTPRequest, body: P.SamplingBody, prompts: list[list[int]],
                        prompt_field: str, max_tokens: int | None, default_tokens: int | None,
                        per: int | None = None) -> Job:
        """The request's rows submitted: `per` samples per prompt (default n; best_of where the caller ranks)."""
        per = per or body.n
        adapter = await self.registry.resolve(body.model)
        http.state.adapter = body.model  # metrics label, only once the model is known to be served
        self.check_limits(body, prompts, prompt_field, per)
        if max_tokens is not None and max_tokens > self.settings.max_tokens:
            raise APIError(400, f"max_tokens {max_tokens} exceeds this server's cap {self.settings.max_tokens}",
                           param="max_tokens")
        beams = beam_fields(body, self.settings.max_num_beams, self.scheduler.max_batch)
        check_beams(body, beams)
        check = partial(control_fields, body, len(self.tokenizer), getattr(self.scheduler, "grammars", None))
        # A grammar parses (and compiles, in-process) on a worker thread; without one there is nothing slow.
        controls = await run_in_threadpool(check) if has_grammar(body) else check()
        # Disk reads (a cold adapter, a guidance negative) happen on a worker thread, never on the loop. A
        # manifest's recommended guidance is for sampling: beams (checked above to ask for none) run without.
        prep = await run_in_threadpool(self.registry.prepare, adapter, 1.0 if beams else body.guidance_scale,
                                       body.guidance_negative, body.compose_mode, body.compose_weights,
                                       beams is not None)
        job = Job(self.scheduler, self.metrics.ttft.labels(adapter=body.model))
        for p, ids in enumerate(prompts):
            room = self._room(p, ids, prep.virtual, max_tokens, prompt_field)
            new = max_tokens if max_tokens is not None else min(default_tokens or room, room,
                                                                self.settings.max_tokens)
            self._add_rows(job, body, p, ids, adapter, prep, new, beams, controls, per)
        # A request that could never fit (alone) is the client's error; one that fits later is a 429 (submit).
        need = sum(map(cost, job.requests))
        if need > self.scheduler.max_inflight_tokens:
            raise APIError(400, f"this request needs {need} tokens of batch room (prompt + max_tokens per row); "
                           f"this server's limit max_inflight_tokens is {self.scheduler.max_inflight_tokens}",
                           param="max_tokens", code="limit_exceeded")
        await job.submit()
        return job


def app_state(http: HTTPRequest) -> AppState:
    return http.app.state.prefixtune
