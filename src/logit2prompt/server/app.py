"""An OpenAI-compatible HTTP server for a local target, with the knobs providers differ on.

`logit2prompt serve` exposes /v1/models, /v1/completions and /v1/chat/completions with
`logprobs`/`top_logprobs` (capped), `logit_bias`, `temperature`, `max_tokens` and `seed`. A
provider can test its own settings: which defense is applied to the exposed log-probs, how
many top log-probs are shown, and whether they are computed before or after `logit_bias`
(OpenAI-style "after"; llama.cpp-style "before", where the sampled token's unbiased log-prob
is always included). The official `openai` client works against it unchanged.

Routes live here; the request schemas and config in `schemas`, generation in `engine` (their
names are re-exported from this module).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid

from ..defenses.leak import LeakFilter
from ..targets.hf import HFTarget
from ..targets.vocab import token_text
from .engine import MIN_TEMPERATURE, PROMPT_CACHE_SIZE, Engine, Step
from .schemas import (
    BIAS_LIMIT,
    LOGPROBS_MODES,
    OPENAI_TOP_LOGPROBS_CAP,
    TEMPERATURE_LIMIT,
    Bias,
    ChatRequest,
    CompletionRequest,
    Message,
    ServerConfig,
    ServerError,
    TextPart,
    _Request,
)

__all__ = [
    "BIAS_LIMIT",
    "Bias",
    "LOGPROBS_MODES",
    "MIN_TEMPERATURE",
    "OPENAI_TOP_LOGPROBS_CAP",
    "PROMPT_CACHE_SIZE",
    "TEMPERATURE_LIMIT",
    "ChatRequest",
    "CompletionRequest",
    "Engine",
    "Message",
    "ServerConfig",
    "ServerError",
    "Step",
    "TextPart",
    "create_app",
    "serve",
    "startup_info",
]

logger = logging.getLogger(__name__)


def create_app(target: HFTarget, config: ServerConfig | None = None):
    """The FastAPI application serving `target`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = config or ServerConfig()
    engine = Engine(target, config)
    leak = LeakFilter(config.leak_filter) if config.leak_filter else None
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
        if name := req.unsupported():
            raise ServerError(
                f"{name} is not supported by this server (only its no-op value is accepted)",
                param=name,
            )
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
                "top_logprobs": [_top_entries(engine, s) for s in steps],
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
        content = engine.text(steps)
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        if leak is not None and system and leak.blocks(content, system):
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": leak.refusal},
                "logprobs": None,
                "finish_reason": "content_filter",
            }
            return envelope("chat.completion", "chatcmpl", choice, len(ids), steps)
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
            "message": {"role": "assistant", "content": content},
            "logprobs": logprobs,
            "finish_reason": finish,
        }
        return envelope("chat.completion", "chatcmpl", choice, len(ids), steps)

    return app


def _top_entries(engine: Engine, step: Step) -> dict[str, float]:
    """A completions step's `top_logprobs`: text -> log-prob, best first. Where several ids
    share a text (partial UTF-8 shown as U+FFFD) the best one's value stands; as llama.cpp
    does, the sampled token is always among the entries."""
    out: dict[str, float] = {}
    for t, v in step.top:
        out.setdefault(token_text(engine.bytes[t]), v)
    out.setdefault(token_text(engine.bytes[step.token]), step.logprob)
    return out


def startup_info(config: ServerConfig, host: str, port: int) -> dict:
    """What a starting server announces: its address and what it exposes."""
    return {
        "serving": config.model_name,
        "url": f"http://{host}:{port}/v1",
        "max_top_logprobs": config.max_top_logprobs,
        "logprobs_mode": config.logprobs_mode,
        "defense": config.chain.spec or None,
        "leak_filter": config.leak_filter,
        "auth": config.api_key is not None,
    }


def serve(
    target: HFTarget, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000
) -> None:
    """Run the server until interrupted (binds to loopback unless told otherwise)."""
    import uvicorn

    app = create_app(target, config)
    logger.info("serving %s", json.dumps(startup_info(config, host, port)))
    uvicorn.run(app, host=host, port=port, log_level="warning")
