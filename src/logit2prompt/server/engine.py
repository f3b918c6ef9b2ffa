"""Token-by-token generation behind the server, with logit_bias and exposed log-probs."""

from __future__ import annotations

import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..defenses.chain import sampleable
from ..targets.hf import HFTarget
from ..targets.vocab import token_bytes, token_text
from .schemas import ServerConfig, ServerError

MIN_TEMPERATURE = 1e-4  # below this, logits / T overflows: treat as greedy, like temperature 0
# A token id as a logit_bias key: optional sign, at most 9 digits (no vocabulary is larger).
_TOKEN_ID = re.compile(r"\s*-?[0-9]{1,9}\s*")
PROMPT_CACHE_SIZE = 64  # prompts whose first-token logits are kept: recovery re-asks one prompt


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
            # ASCII digits only: str.isdigit() and int() also take "²" or Arabic-Indic digits.
            if not _TOKEN_ID.fullmatch(key):
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
        served = self.config.chain.served
        steps: list[Step] = []
        cache = None
        logits = self._first_logits(ids) if max_tokens <= 1 else None
        for i in range(max_tokens):
            if logits is None or i > 0:
                logits, cache = self._forward(ids if i == 0 else [steps[-1].token], cache, i, ids)
            biased = logits + bias_vec
            base = biased if self.config.logprobs_mode == "after" else logits
            exposed = self.config.chain.apply(torch.log_softmax(base, dim=-1)[None])[0]
            sampled = biased
            if served:  # topk, topp, noise, temperature change the service, not only the display
                sampled = sampleable(served.apply(torch.log_softmax(biased, dim=-1)[None])[0])
            if temperature < MIN_TEMPERATURE:
                token = int(sampled.argmax())
            else:
                probs = torch.softmax(sampled / temperature, dim=-1)
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
