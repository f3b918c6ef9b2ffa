"""Token-subset observations: the log-probs of a fixed set S of a little more than d + 1 tokens.

A softmax LM's log-probs are `log p = W.h + b - logsumexp(W.h + b)`, an affine image of the
d-dimensional hidden state h. So the log-probs of any fixed subset S with |S| > d + 1 tokens
(chosen once, seeded) determine h, and with it every other entry: PILS (Nazir et al. 2025)
reads an additive log-ratio over d + 100 random tokens for this reason. Through an API, S costs
about |S| / (k - 1) queries per step at top-k instead of V / (k - 1).

An observation is the S entries *centred* (their mean subtracted). Centring drops the
normaliser, which some strategies cannot see ("gap" reads logits relative to the top token)
and which carries no information beyond h, so every way of reading S gives the same numbers.

- `TokenSubset`: the ids (recorded in full in store manifests and inverter configs, with the
  tokenizer's hash and a sha256 that refusals compare), `observe(full)` -> observation.
- `SubsetDecoder`: observation -> full log-probs, given a basis of the target's vectors (its
  output layer, or one fitted from full vectors), with the least-squares residual of the
  over-determined fit as a built-in check (noise, rounding or another model break it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import VectorError

SUBSET = "subset"
SUBSET_MARGIN = 100  # tokens beyond the hidden size (PILS: d + 100)
RESIDUAL_TOLERANCE = 1e-3  # nats: max |fit - observed| a reconstruction may leave on S


def eligible_ids(tokenizer, vocab_size: int) -> list[int]:
    """Ids an API can name unambiguously in every endpoint style: not special/added tokens,
    and with a visible string no other id shares (legacy completions name tokens by it)."""
    from .vocab import token_bytes, token_text

    raw = token_bytes(tokenizer, vocab_size)
    texts = [token_text(r) for r in raw]
    counts: dict[str, int] = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    n = min(vocab_size, len(tokenizer))
    return [i for i in range(n) if i not in added and counts[texts[i]] == 1 and texts[i]]


@dataclass(frozen=True)
class TokenSubset:
    """A fixed, sorted set of token ids of one tokenizer; what a subset observation reads."""

    ids: tuple[int, ...]
    vocab_size: int
    tokenizer_sha256: str
    seed: int = 0

    @classmethod
    def choose(cls, tokenizer, vocab_size: int, size: int, seed: int = 0) -> TokenSubset:
        """`size` ids drawn (seeded) from the tokenizer's unambiguous ones (`eligible_ids`)."""
        from .hf import hash_tokenizer

        pool = eligible_ids(tokenizer, vocab_size)
        if not 2 <= size <= len(pool):
            raise VectorError(
                f"a token subset needs 2 to {len(pool)} tokens of this tokenizer, not {size}"
            )
        rng = np.random.default_rng(seed)
        ids = np.sort(rng.choice(np.asarray(pool), size, replace=False))
        return cls(tuple(int(i) for i in ids), vocab_size, hash_tokenizer(tokenizer), seed)

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def sha256(self) -> str:
        h = hashlib.sha256(np.asarray(self.ids, dtype=np.int64).tobytes())
        h.update(f"{self.vocab_size}:{self.tokenizer_sha256}".encode())
        return h.hexdigest()

    def encoding(self) -> dict:
        """How stores and inverter configs record it (ids in full: no tokenizer needed)."""
        return {
            "kind": SUBSET,
            "width": self.size,
            "vocab_size": self.vocab_size,
            "seed": self.seed,
            "tokenizer_sha256": self.tokenizer_sha256,
            "subset_sha256": self.sha256,
            "ids": list(self.ids),
        }

    @classmethod
    def from_encoding(cls, d: dict) -> TokenSubset:
        """Read a recorded subset; VectorError if its ids do not match its own hash."""
        try:
            subset = cls(
                tuple(int(i) for i in d["ids"]),
                int(d["vocab_size"]),
                str(d["tokenizer_sha256"]),
                int(d.get("seed", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise VectorError(f"malformed token subset record: {exc}") from exc
        if d.get("subset_sha256") not in (None, subset.sha256):
            raise VectorError("token subset record is corrupted: its ids do not match its hash")
        return subset

    def describe(self) -> str:
        return f"{self.size} tokens (seed {self.seed}, subset {self.sha256[:8]})"

    def differences(self, other: TokenSubset) -> list[str]:
        """Why `other` is not this subset (empty when they match)."""
        out = []
        if self.tokenizer_sha256 != other.tokenizer_sha256:
            out.append("another tokenizer")
        if self.vocab_size != other.vocab_size:
            out.append(f"vocab {self.vocab_size} vs {other.vocab_size}")
        if self.ids != other.ids:
            out.append(f"token subset {self.describe()} vs {other.describe()}")
        return out

    def observe(self, logprobs):
        """Observation `[..., |S|]` of full log-prob vectors `[..., vocab]` (numpy or torch)."""
        if logprobs.shape[-1] != self.vocab_size:
            raise VectorError(
                f"vectors of {logprobs.shape[-1]} entries cannot be read through a subset of a "
                f"{self.vocab_size}-token vocabulary"
            )
        index = torch.tensor(self.ids) if torch.is_tensor(logprobs) else np.asarray(self.ids)
        return centre(logprobs[..., index])


def centre(x):
    """Subtract each row's mean (numpy or torch), in float32."""
    if torch.is_tensor(x):
        x = x.float()
        return x - x.mean(-1, keepdim=True)
    x = np.asarray(x, dtype=np.float32)
    return x - x.mean(-1, keepdims=True)


def default_subset_size(hidden_size: int) -> int:
    """PILS's choice: the hidden size plus SUBSET_MARGIN tokens."""
    return int(hidden_size) + SUBSET_MARGIN


class SubsetDecoder:
    """Full log-probs from subset observations, through a linear basis of the target's
    vectors (`basis.linear()` -> (L [vocab, r], b [vocab] or None): log p = log_softmax(L a + b)).

    The coefficients a solve the over-determined system on S by least squares (float64); the
    fit's largest residual on S says whether the observation really is this basis's."""

    def __init__(self, subset: TokenSubset, basis):
        weight, bias = basis.linear()
        if weight.shape[0] != subset.vocab_size:
            raise VectorError(
                f"a basis of {weight.shape[0]} tokens cannot rebuild vectors of a "
                f"{subset.vocab_size}-token vocabulary"
            )
        self.subset = subset
        self.weight = weight.float()
        self.bias = None if bias is None else bias.float()
        index = torch.tensor(subset.ids)
        rows = weight[index].double()
        a = rows - rows.mean(0, keepdim=True)
        self.offset = (
            torch.zeros(subset.size, dtype=torch.float64)
            if bias is None
            else centre(bias[index].double()).double()
        )
        sing = torch.linalg.svdvals(a)
        if subset.size <= weight.shape[1] or sing[-1] <= sing[0] * 1e-7:
            raise VectorError(
                f"a subset of {subset.size} tokens cannot determine a basis of width "
                f"{weight.shape[1]}: choose at least {weight.shape[1] + 1} (the default, width + "
                f"{SUBSET_MARGIN}, leaves room for the residual check)"
            )
        self.system = a
        self.solve = torch.linalg.pinv(a)  # [r, |S|]

    def coefficients(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Basis coefficients `[n, r]` of observations `[n, |S|]` and each row's max residual."""
        y = obs.double() - self.offset
        coef = y @ self.solve.T
        residual = (coef @ self.system.T - y).abs().amax(-1)
        return coef, residual

    def decode(
        self, obs, tolerance: float | None = RESIDUAL_TOLERANCE
    ) -> tuple[np.ndarray, np.ndarray]:
        """(float32 log-probs `[..., vocab]`, max residual on S `[...]`) of observations
        `[..., |S|]`. VectorError when a residual exceeds `tolerance` (None: no check)."""
        x = torch.as_tensor(np.asarray(obs, dtype=np.float64))
        lead = x.shape[:-1]
        coef, residual = self.coefficients(x.reshape(-1, self.subset.size))
        bad = ~(residual <= tolerance) if tolerance is not None else None  # NaN is bad too
        if bad is not None and bool(bad.any()):
            worst = int(bad.nonzero()[0])
            raise VectorError(
                f"observation {worst} does not lie in the basis's subspace (residual "
                f"{float(residual[worst]):.2e} nats on the token subset > {tolerance:g}): "
                "another model, a quantised or noisy endpoint, or a defense"
            )
        out = []
        for start in range(0, len(coef), 1024):
            logits = coef[start : start + 1024].float() @ self.weight.T
            if self.bias is not None:
                logits = logits + self.bias
            out.append(torch.log_softmax(logits, -1))
        full = torch.cat(out) if out else torch.empty(0, self.subset.vocab_size)
        return (
            full.reshape(*lead, self.subset.vocab_size).numpy(),
            residual.reshape(lead).float().numpy(),
        )


def subset_of_store_or_config(encoding: dict | None) -> TokenSubset | None:
    """The subset a store encoding or inverter config records, or None."""
    if not encoding or encoding.get("kind") != SUBSET:
        return None
    return TokenSubset.from_encoding(encoding)


def observe_coordinates(basis, coords: np.ndarray, subset: TokenSubset) -> np.ndarray:
    """Observations `[..., |S|]` straight from a compact store's coordinates `[..., width]`:
    centring cancels the normaliser, so only the S rows of the basis are needed."""
    weight, bias = basis.linear()
    index = torch.tensor(subset.ids)
    logits = torch.from_numpy(np.ascontiguousarray(coords, dtype=np.float32)) @ weight[index].T
    if bias is not None:
        logits = logits + bias[index]
    return centre(logits).numpy()
