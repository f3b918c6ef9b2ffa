"""Defenses a provider can apply to the log-probs it exposes, composable from a string.

    "temperature:2"            divide logits by T, renormalise
    "topk:20"                  sample-time top-K: renormalise over the K best, the rest -> floor
    "topp:0.9"                 nucleus: the smallest set with mass >= p, renormalised; rest -> floor
    "expose:5"                 what APIs show: the top-k log-probs unchanged, the rest -> floor
    "noise:gauss:0.5"          add N(0, sigma^2) to every logit, renormalise
    "noise:laplace:0.5"        add Laplace(0, b) to every logit, renormalise
    "round:1"                  round log-probs to n decimals

A spec joins several with commas and applies them left to right: "topk:20,noise:gauss:0.5".
Noise is drawn from a generator seeded by the row's content, so the same prompt always gets the
same noise: stores stay reproducible and resumable, and an attacker cannot average the noise
away by repeating a query (as with a provider that caches answers).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from ..errors import Logit2PromptError

FLOOR = -100.0  # the log-prob reported for entries a defense hides (~e^-100: never sampled)
# Defenses that change only what is displayed: the service still samples the clean distribution.
DISPLAY_ONLY = ("expose", "round")
DEFAULT_SENSITIVITY = 1.0  # nats; the per-logit change a privacy guarantee is stated for
DEFAULT_DELTA = 1e-5


class DefenseError(Logit2PromptError, ValueError):
    """A defense spec could not be parsed or has out-of-range parameters."""


def _renormalise(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1)


def _mask_rest(logprobs: torch.Tensor, keep: torch.Tensor, renormalise: bool) -> torch.Tensor:
    # Hidden entries stay -inf through the rest of the chain (a later temperature or noise
    # must not lift them back into the distribution); the chain shows them at FLOOR.
    kept = logprobs.masked_fill(~keep, float("-inf"))
    return _renormalise(kept) if renormalise else kept


@dataclass(frozen=True)
class Defense:
    """One transform: a kind and its parameters, e.g. Defense('noise', ('gauss', 0.5))."""

    kind: str
    params: tuple

    @property
    def spec(self) -> str:
        return ":".join([self.kind, *(_fmt(p) for p in self.params)])

    def apply(self, logprobs: torch.Tensor) -> torch.Tensor:
        """Transform float log-probs `[..., vocab]` (each row a normalised distribution)."""
        x = logprobs.float()
        if self.kind == "temperature":
            return _renormalise(x / self.params[0])
        if self.kind in ("topk", "expose"):
            k = min(int(self.params[0]), x.shape[-1])
            # Keep by rank, not by threshold, so ties never keep more than k.
            keep = torch.zeros_like(x, dtype=torch.bool).scatter_(
                -1, x.topk(k, dim=-1).indices, True
            )
            return _mask_rest(x, keep, renormalise=self.kind == "topk")
        if self.kind == "topp":
            p = self.params[0]
            sorted_lp, order = x.sort(dim=-1, descending=True)
            mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
            keep_sorted = mass_before < p  # the smallest prefix whose mass reaches p
            keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
            return _mask_rest(x, keep, renormalise=True)
        if self.kind == "noise":
            dist, scale = self.params
            noise = _seeded_noise(x, dist, scale)
            return _renormalise(x + noise)
        if self.kind == "round":
            factor = 10.0 ** int(self.params[0])
            return torch.round(x * factor) / factor
        raise DefenseError(f"unknown defense {self.kind!r}")

    def privacy(
        self, sensitivity: float = DEFAULT_SENSITIVITY, delta: float = DEFAULT_DELTA
    ) -> dict:
        """The differential-privacy epsilon the noise implies per logit, for a stated
        sensitivity (how much one prompt change may move a logit); {} for other defenses."""
        if self.kind != "noise":
            return {}
        dist, scale = self.params
        if dist == "laplace":  # Laplace mechanism: epsilon = sensitivity / b
            return {"epsilon": sensitivity / scale, "delta": 0.0, "sensitivity": sensitivity}
        # Classic Gaussian mechanism (valid for epsilon < 1): sigma = S sqrt(2 ln(1.25/d)) / eps
        eps = sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / scale
        return {"epsilon": eps, "delta": delta, "sensitivity": sensitivity}


def _fmt(p) -> str:
    return f"{p:g}" if isinstance(p, float) else str(p)


def laplace_from_uniform(uniform: torch.Tensor, scale: float) -> torch.Tensor:
    """Laplace(0, scale) by inverse CDF from U[0, 1) draws."""
    # rand() can return exactly 0 (and values below eps round to it after the shift), where
    # log1p(-1) is -inf: keep the draw at least one float32 eps inside the interval.
    u = uniform.clamp(min=torch.finfo(torch.float32).eps) - 0.5
    return -scale * torch.sign(u) * torch.log1p(-2 * u.abs())


def _seeded_noise(x: torch.Tensor, dist: str, scale: float) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape)  # drawn on the CPU generator, whatever the rows' device
    for i, row in enumerate(rows):
        # Seed from the row's top entries: identical inputs get identical noise.
        top = row.topk(min(8, row.shape[-1]))
        digest = hashlib.sha256(
            top.indices.cpu().numpy().tobytes()
            + top.values.round(decimals=3).cpu().numpy().tobytes()
        ).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        if dist == "gauss":
            out[i] = torch.randn(row.shape, generator=gen) * scale
        else:
            out[i] = laplace_from_uniform(torch.rand(row.shape, generator=gen), scale)
    return out.reshape(x.shape).to(x.device)


# ----------------------------------------------------------------------------- parsing
_ARITY = {"temperature": 1, "topk": 1, "topp": 1, "expose": 1, "noise": 2, "round": 1}


def _parse_one(text: str) -> Defense:
    parts = [p.strip() for p in text.split(":")]
    kind, raw = parts[0].lower(), parts[1:]
    if kind not in _ARITY:
        raise DefenseError(f"unknown defense {kind!r} in {text!r}; known: {', '.join(_ARITY)}")
    if len(raw) != _ARITY[kind]:
        raise DefenseError(
            f"{kind} takes {_ARITY[kind]} parameter(s) ({_usage(kind)}), got {text!r}"
        )
    if kind == "noise" and raw[0].lower() not in ("gauss", "laplace"):
        raise DefenseError(f"noise must be gauss or laplace, got {raw[0]!r}")
    try:
        if kind == "noise":
            params: tuple = (raw[0].lower(), float(raw[1]))
        elif kind in ("topk", "expose", "round"):
            params = (int(raw[0]),)
        else:
            params = (float(raw[0]),)
    except ValueError as exc:
        raise DefenseError(f"bad number in {text!r} ({_usage(kind)})") from exc
    value = params[-1]
    if kind in ("temperature", "noise") and not 0 < value < math.inf:
        raise DefenseError(f"{kind} needs a positive, finite scale, got {text!r}")
    if kind in ("topk", "expose") and value < 1:
        raise DefenseError(f"{kind} needs k >= 1, got {text!r}")
    if kind == "topp" and not 0 < value <= 1:
        raise DefenseError(f"topp needs 0 < p <= 1, got {text!r}")
    if kind == "round" and not 0 <= value <= 8:
        raise DefenseError(f"round needs 0..8 decimals, got {text!r}")
    return Defense(kind, params)


def _usage(kind: str) -> str:
    return {
        "temperature": "temperature:T",
        "topk": "topk:K",
        "topp": "topp:P",
        "expose": "expose:K",
        "noise": "noise:gauss|laplace:SCALE",
        "round": "round:DECIMALS",
    }[kind]


@dataclass(frozen=True)
class DefenseChain:
    """Defenses applied left to right; the empty chain is no defense."""

    defenses: tuple[Defense, ...] = ()

    @property
    def spec(self) -> str:
        return ",".join(d.spec for d in self.defenses)

    def __bool__(self) -> bool:
        return bool(self.defenses)

    def apply(self, logprobs: torch.Tensor) -> torch.Tensor:
        """The defended log-probs; entries a defense hides are shown at FLOOR."""
        for d in self.defenses:
            logprobs = d.apply(logprobs)
        return logprobs.masked_fill(torch.isneginf(logprobs), FLOOR)

    @property
    def served(self) -> DefenseChain:
        """The defenses that change what the service samples (all but the display-only)."""
        return DefenseChain(tuple(d for d in self.defenses if d.kind not in DISPLAY_ONLY))


def sampleable(defended: torch.Tensor) -> torch.Tensor:
    """Defended log-probs as a service samples them: the entries shown at FLOOR are -inf."""
    return defended.masked_fill(defended <= FLOOR, float("-inf"))


class DefenseLogitsProcessor:
    """A transformers logits processor that makes generation sample from the defended
    distribution (what a provider applying the defense would serve)."""

    def __init__(self, chain: DefenseChain):
        self.chain = chain

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        defended = self.chain.apply(torch.log_softmax(scores.float(), dim=-1))
        return sampleable(defended).to(scores.dtype)


def parse_defense(spec: str | None) -> DefenseChain:
    """Parse "topk:20,noise:gauss:0.5" (or "" / None / "none") into a chain."""
    if spec is None or not spec.strip() or spec.strip().lower() == "none":
        return DefenseChain()
    items = spec.split(",")
    if any(not s.strip() for s in items):
        raise DefenseError(f"empty item in defense spec {spec!r}")
    return DefenseChain(tuple(_parse_one(s) for s in items))
