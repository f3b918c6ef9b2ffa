"""A target whose exposed distributions pass through a defense chain first."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ..defenses.chain import DefenseChain
from .base import Target


class DefendedTarget(Target):
    """Wraps a target; its fingerprint records the defense, so defended and clean data differ."""

    def __init__(self, target: Target, chain: DefenseChain):
        self.inner = target
        self.chain = chain
        self.fingerprint = replace(target.fingerprint, defense=chain.spec)

    def next_token_logprobs(self, prompts: Sequence[str], steps: int | None = None) -> torch.Tensor:
        return self.chain.apply(self.inner.next_token_logprobs(prompts, steps=steps))

    def count_tokens(self, prompts: Sequence[str]) -> list[int]:
        return self.inner.count_tokens(prompts)

    @property
    def max_context(self) -> int | None:
        return self.inner.max_context

    @property
    def max_steps(self) -> int | None:
        return self.inner.max_steps

    def __getattr__(self, name: str):
        # Only what the wrapped target has: token ids and an API's query report pass through,
        # and vectors read from ids are defended too. An API target has no ids, so collection
        # must see no `encode` here either.
        inner = self.__dict__.get("inner")
        if inner is None or name not in ("encode", "forward_ids", "collection_report"):
            raise AttributeError(name)
        value = getattr(inner, name)
        if name != "forward_ids":
            return value

        def forward_ids(batch: list[list[int]], steps: int = 1) -> torch.Tensor:
            # Greedy steps follow the undefended model: the defense changes what is shown,
            # not what the model generates (as in a provider's logprobs field).
            return self.chain.apply(value(batch, steps))

        return forward_ids
