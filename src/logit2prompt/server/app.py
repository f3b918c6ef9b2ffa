"""An OpenAI-compatible HTTP server for a local target, with the knobs providers differ on.

`logit2prompt serve` exposes /v1/models, /v1/completions and /v1/chat/completions with
`logprobs`/`top_logprobs` (capped), `logit_bias`, `temperature`, `max_tokens` and `seed`. A
provider can test its own settings: which defense is applied to the exposed log-probs, how
many top log-probs are shown, and whether they are computed before or after `logit_bias`
(OpenAI-style "after"; llama.cpp-style "before", where the sampled token's unbiased log-prob
is always included). The official `openai` client works against it unchanged.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..defenses.chain import DefenseChain, parse_defense
from ..errors import Logit2PromptError
from ..targets.hf import HFTarget
from ..targets.vocab import token_bytes, token_text

LOGPROBS_MODES = ("after", "before")
# OpenAI's documented bounds; a provider can lower them with ServerConfig.
BIAS_LIMIT = 100.0
TEMPERATURE_LIMIT = 2.0
OPENAI_TOP_LOGPROBS_CAP = 20
MIN_TEMPERATURE = 1e-4  # below this, logits / T overflows: treat as greedy, like temperature 0
PROMPT_CACHE_SIZE = 64  # prompts whose first-token logits are kept: recovery re-asks one prompt


class ServerError(Logit2PromptError):
    """A request the server refuses; carries the HTTP status and OpenAI error fields."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass
class ServerConfig:
    """What the server exposes and the limits it enforces."""

    model_name: str = "logit2prompt-target"
    max_top_logprobs: int = 5  # 0: no log-probs at all
    logprobs_mode: str = "after"  # log-probs computed "after" or "before" logit_bias
    defense: str = ""
    api_key: str | None = None
    max_tokens_limit: int = 256
    max_logit_bias_entries: int = 1024
    max_body_bytes: int = 1 << 20
    max_in_flight: int = 16  # requests beyond this get 429 instead of queueing without bound
    chain: DefenseChain = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ServerError(f"logprobs_mode must be one of {LOGPROBS_MODES}")
        if not 0 <= self.max_top_logprobs <= OPENAI_TOP_LOGPROBS_CAP:
            raise ServerError(f"max_top_logprobs must be 0..{OPENAI_TOP_LOGPROBS_CAP}")
        self.chain = parse_defense(self.defense)


# ----------------------------------------------------------------------------- request schemas
Bias = dict[str, Annotated[float, Field(ge=-BIAS_LIMIT, le=BIAS_LIMIT)]]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=TEMPERATURE_LIMIT)
    logit_bias: Bias | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=OPENAI_TOP_LOGPROBS_CAP)
    echo: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=OPENAI_TOP_LOGPROBS_CAP)
    max_completion_tokens: int | None = Field(default=None, ge=0)


# ----------------------------------------------------------------------------- the engine
@dataclass
class Step:
    token: int
    logprob: float  # the chosen token's exposed log-prob
    top: list[tuple[int, float]]  # the exposed top-k, best first


class Engine:
    """Token-by-token generation on an HFTarget's model with logit_bias and exposed log-probs."""

    def __init__(self, target: HFTarget, config: ServerConfig):
        self.target, self.config = target, config
        self.vocab = target.vocab_size
        self.bytes = token_bytes(target.tokenizer, self.vocab)
        self.eos = {target.tokenizer.eos_token_id} - {None}
        self._lock = threading.Lock()  # one generation at a time: the model is not re-entrant
        self._first: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    # ------------------------------------------------------------- prompts to ids
    def encode_text(self, prompt: str) -> list[int]:
        return self.target.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.target.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return self.target.tokenizer(text, add_special_tokens=False)["input_ids"]

    def check_prompt(self, ids: list[int], max_tokens: int) -> None:
        if not ids:
            raise ServerError("the prompt is empty", param="prompt")
        limit = self.target.max_context
        if limit is not None and len(ids) + max_tokens > limit:
            raise ServerError(
                f"the prompt is {len(ids)} tokens and max_tokens is {max_tokens}; the model's "
                f"context is {limit} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def parse_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        if not bias:
            return {}
        if len(bias) > self.config.max_logit_bias_entries:
            raise ServerError(
                f"logit_bias has {len(bias)} entries; at most "
                f"{self.config.max_logit_bias_entries} are allowed",
                param="logit_bias",
            )
        out = {}
        for key, value in bias.items():
            if not key.strip().lstrip("-").isdigit():
                raise ServerError(f"logit_bias key {key!r} is not a token id", param="logit_bias")
            tid = int(key)
            if not 0 <= tid < self.vocab:
                raise ServerError(
                    f"logit_bias token id {tid} is outside the vocabulary (0..{self.vocab - 1})",
                    param="logit_bias",
                )
            out[tid] = float(value)
        return out

    # ------------------------------------------------------------- generation
    def generate(
        self,
        ids: list[int],
        *,
        max_tokens: int,
        temperature: float,
        bias: dict[int, float],
        top_logprobs: int | None,
        seed: int | None,
    ) -> tuple[list[Step], str]:
        """Generate up to max_tokens; returns the steps and the finish reason."""
        with self._lock:
            return self._generate(ids, max_tokens, temperature, bias, top_logprobs, seed)

    def _generate(self, ids, max_tokens, temperature, bias, top_logprobs, seed):
        bias_vec = torch.zeros(self.vocab)
        if bias:
            bias_vec[torch.tensor(list(bias))] = torch.tensor(list(bias.values()))
        gen = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
        steps: list[Step] = []
        cache = None
        logits = self._first_logits(ids) if max_tokens <= 1 else None
        for i in range(max_tokens):
            if logits is None or i > 0:
                logits, cache = self._forward(ids if i == 0 else [steps[-1].token], cache, i, ids)
            biased = logits + bias_vec
            base = biased if self.config.logprobs_mode == "after" else logits
            exposed = self.config.chain.apply(torch.log_softmax(base, dim=-1)[None])[0]
            if temperature < MIN_TEMPERATURE:
                token = int(biased.argmax())
            else:
                probs = torch.softmax(biased / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=gen))
            top = []
            if top_logprobs:
                values, order = exposed.topk(min(top_logprobs, self.vocab))
                top = list(zip(order.tolist(), values.tolist(), strict=True))
            steps.append(Step(token, float(exposed[token]), top))
            if token in self.eos:
                return steps, "stop"
        return steps, "length"

    def _first_logits(self, ids: list[int]) -> torch.Tensor:
        """First-token logits, cached per prompt: API recovery asks one prompt many times."""
        key = tuple(ids)
        if key in self._first:
            self._first.move_to_end(key)
            return self._first[key]
        logits, _ = self._forward(ids, None, 0, ids)
        self._first[key] = logits
        if len(self._first) > PROMPT_CACHE_SIZE:
            self._first.popitem(last=False)
        return logits

    @torch.inference_mode()
    def _forward(self, new_ids: list[int], cache, step: int, prompt: list[int]):
        t = self.target
        n_past = 0 if step == 0 else len(prompt) + step - 1
        inputs = torch.tensor([new_ids], dtype=torch.long, device=t.device)
        positions = torch.arange(n_past, n_past + len(new_ids), device=t.device)[None]
        kwargs = {"use_cache": True}
        if cache is not None:
            kwargs[t._cache_kw] = cache
        if t._keep_kw:
            kwargs["logits_to_keep"] = 1
        out = t.model(input_ids=inputs, position_ids=positions, **kwargs)
        cache = getattr(out, t._cache_kw, None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        # log_softmax removes the logits' arbitrary offset; bias and sampling are unaffected.
        return torch.log_softmax(out.logits[0, -1].float().cpu(), dim=-1), cache

    # ------------------------------------------------------------- response pieces
    def entry(self, tid: int, logprob: float) -> dict:
        raw = self.bytes[tid]
        return {"token": token_text(raw), "logprob": logprob, "bytes": list(raw)}

    def text(self, steps: list[Step]) -> str:
        # Joined raw bytes, so the text of any token matches its `bytes` entry exactly.
        return token_text(b"".join(self.bytes[s.token] for s in steps if s.token not in self.eos))


# ----------------------------------------------------------------------------- the app
def create_app(target: HFTarget, config: ServerConfig | None = None):
    """The FastAPI application serving `target`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = config or ServerConfig()
    engine = Engine(target, config)
    app = FastAPI(
        title="logit2prompt OpenAI-compatible server",
        version="1",
        description="A local target behind the OpenAI API, with configurable log-prob exposure.",
    )
    app.state.engine = engine
    app.state.requests = 0
    in_flight = {"n": 0}

    def error(status: int, message: str, param=None, code=None, kind=None) -> JSONResponse:
        kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        headers = {"Retry-After": "1"} if status == 429 else None
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ServerError)
    async def _server_error(_request, exc: ServerError):
        return error(exc.status, str(exc), exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        problems = []
        for e in exc.errors()[:5]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            problems.append(f"{where or 'body'}: {e.get('msg')}")
        param = ".".join(str(x) for x in exc.errors()[0].get("loc", ())[1:2]) or None
        return error(400, "invalid request: " + "; ".join(problems), param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        # Auth first, then size, then load: cheap refusals before any work.
        if config.api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                return error(401, "missing or wrong API key", kind="authentication_error")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            return error(413, f"request body over {config.max_body_bytes} bytes")
        if length is None and request.method == "POST":
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > config.max_body_bytes:
                    return error(413, f"request body over {config.max_body_bytes} bytes")
            request._body = body
        if in_flight["n"] >= config.max_in_flight:
            return error(429, "too many requests in flight; retry shortly", kind="rate_limit")
        in_flight["n"] += 1
        app.state.requests += 1
        try:
            return await call_next(request)
        finally:
            in_flight["n"] -= 1

    def check_common(req: _Request, top: int | None, max_tokens: int | None) -> int:
        if req.model != config.model_name:
            raise ServerError(
                f"model {req.model!r} does not exist; this server serves {config.model_name!r}",
                status=404,
                param="model",
                code="model_not_found",
            )
        if req.stream:
            raise ServerError("streaming is not supported", param="stream")
        if top is not None and config.max_top_logprobs == 0:
            raise ServerError("log-probs are not exposed by this server", param="logprobs")
        if top and top > config.max_top_logprobs:
            what = (
                "log-probs are not exposed"
                if config.max_top_logprobs == 0
                else (f"at most {config.max_top_logprobs} top log-probs are exposed")
            )
            raise ServerError(f"{what}; asked for {top}", param="logprobs")
        n = 16 if max_tokens is None else max_tokens
        if n > config.max_tokens_limit:
            raise ServerError(
                f"max_tokens {n} is over this server's limit of {config.max_tokens_limit}",
                param="max_tokens",
            )
        return n

    async def run(ids: list[int], req: _Request, max_tokens: int, top: int | None):
        """The part both endpoints share once the prompt is tokens: checks, then generation."""
        engine.check_prompt(ids, max_tokens)
        bias = engine.parse_bias(req.logit_bias)
        return await run_in_threadpool(
            engine.generate,
            ids,
            max_tokens=max_tokens,
            temperature=req.temperature,
            bias=bias,
            top_logprobs=top,
            seed=req.seed,
        )

    def envelope(kind: str, id_prefix: str, choice: dict, prompt_tokens: int, steps) -> dict:
        return {
            "id": f"{id_prefix}-{uuid.uuid4().hex[:24]}",
            "object": kind,
            "created": int(time.time()),
            "model": config.model_name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(steps),
                "total_tokens": prompt_tokens + len(steps),
            },
        }

    @app.get("/v1/models")
    async def list_models():
        return {
            "object": "list",
            "data": [
                {"id": config.model_name, "object": "model", "created": 0, "owned_by": "local"}
            ],
        }

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        if model_id != config.model_name:
            raise ServerError(f"model {model_id!r} does not exist", 404, "model", "model_not_found")
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "local"}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        max_tokens = check_common(req, req.logprobs, req.max_tokens)
        if req.echo:
            raise ServerError("echo is not supported", param="echo")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ServerError("exactly one prompt per request is supported", param="prompt")
        ids = engine.encode_text(prompts[0]) if prompts[0] else []
        steps, finish = await run(ids, req, max_tokens, req.logprobs)
        logprobs = None
        if req.logprobs is not None:
            text_offset, pos = [], 0
            for s in steps:
                text_offset.append(pos)
                pos += len(token_text(engine.bytes[s.token]))
            logprobs = {
                "tokens": [token_text(engine.bytes[s.token]) for s in steps],
                "token_logprobs": [s.logprob for s in steps],
                # As llama.cpp does: the sampled token is always among its step's entries.
                "top_logprobs": [
                    {
                        **{token_text(engine.bytes[t]): v for t, v in s.top},
                        token_text(engine.bytes[s.token]): s.logprob,
                    }
                    for s in steps
                ],
                "text_offset": text_offset,
            }
        choice = {
            "text": engine.text(steps),
            "index": 0,
            "logprobs": logprobs,
            "finish_reason": finish,
        }
        return envelope("text_completion", "cmpl", choice, len(ids), steps)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        top = req.top_logprobs if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise ServerError("top_logprobs needs logprobs=true", param="top_logprobs")
        if req.logprobs and config.max_top_logprobs == 0:
            raise ServerError("log-probs are not exposed by this server", param="logprobs")
        max_tokens = check_common(
            req, top, req.max_completion_tokens if req.max_tokens is None else req.max_tokens
        )
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in req.messages
        ]
        try:
            ids = engine.encode_chat(messages)
        except Exception as exc:  # the template's own checks (role order and the like)
            raise ServerError(f"the chat template rejected the messages: {exc}") from exc
        steps, finish = await run(ids, req, max_tokens, top)
        logprobs = None
        if req.logprobs:
            logprobs = {
                "content": [
                    {
                        **engine.entry(s.token, s.logprob),
                        "top_logprobs": [engine.entry(t, v) for t, v in s.top],
                    }
                    for s in steps
                ]
            }
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": engine.text(steps)},
            "logprobs": logprobs,
            "finish_reason": finish,
        }
        return envelope("chat.completion", "chatcmpl", choice, len(ids), steps)

    return app


def serve(
    target: HFTarget, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000
) -> None:
    """Run the server until interrupted (binds to loopback unless told otherwise)."""
    import uvicorn

    app = create_app(target, config)
    print(
        json.dumps(
            {
                "serving": config.model_name,
                "url": f"http://{host}:{port}/v1",
                "max_top_logprobs": config.max_top_logprobs,
                "logprobs_mode": config.logprobs_mode,
                "defense": config.chain.spec or None,
                "auth": config.api_key is not None,
            }
        ),
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
