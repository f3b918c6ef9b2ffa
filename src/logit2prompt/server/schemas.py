"""What the server accepts: its configuration, its errors and the request schemas.

The pydantic models mirror the OpenAI request bodies; their bounds are OpenAI's documented ones
(a provider can lower some with `ServerConfig`), so the generated OpenAPI schema tells clients
exactly what is refused before any generation runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..defenses.chain import DefenseChain, parse_defense
from ..errors import Logit2PromptError

LOGPROBS_MODES = ("after", "before")
# OpenAI's documented bounds; a provider can lower them with ServerConfig.
BIAS_LIMIT = 100.0
TEMPERATURE_LIMIT = 2.0
OPENAI_TOP_LOGPROBS_CAP = 20


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
    # A prompt-leak guard: a chat reply repeating this fraction of the system message's word
    # 3-grams is replaced by a refusal, without log-probs (finish_reason "content_filter").
    leak_filter: float | None = None
    chain: DefenseChain = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ServerError(f"logprobs_mode must be one of {LOGPROBS_MODES}")
        if not 0 <= self.max_top_logprobs <= OPENAI_TOP_LOGPROBS_CAP:
            raise ServerError(f"max_top_logprobs must be 0..{OPENAI_TOP_LOGPROBS_CAP}")
        self.chain = parse_defense(self.defense)
        if self.leak_filter is not None and not 0 < self.leak_filter <= 1:
            raise ServerError(f"leak_filter must be in (0, 1], got {self.leak_filter}")


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
    # Controls this server does not implement, accepted at their no-op values only: a client
    # that relies on one gets a 400 (`unsupported`), not output that silently ignores it.
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)

    NO_OP: ClassVar[dict[str, tuple]] = {
        "top_p": (None, 1.0),
        "stop": (None, "", []),
        "presence_penalty": (None, 0.0),
        "frequency_penalty": (None, 0.0),
    }

    def unsupported(self) -> str | None:
        """The first parameter set to something this server would ignore, or None."""
        return next((k for k, ok in self.NO_OP.items() if getattr(self, k) not in ok), None)


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=OPENAI_TOP_LOGPROBS_CAP)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None

    NO_OP: ClassVar[dict[str, tuple]] = {
        **_Request.NO_OP,
        "best_of": (None, 1),
        "suffix": (None, ""),
    }


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
    tools: list | None = None
    response_format: dict | None = None

    NO_OP: ClassVar[dict[str, tuple]] = {
        **_Request.NO_OP,
        "tools": (None, []),
        "response_format": (None, {"type": "text"}),
    }
