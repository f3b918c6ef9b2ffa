"""The three ways to read a full next-token distribution through `logit_bias`.

"bias-block"  log-probs are reported *after* logit_bias (OpenAI-style): bias a reference token
              and k-1 new tokens by the same amount; their reported differences are the
              unbiased differences. Queries per distribution: 1 + ceil((V-1)/(k-1)).
"force"       log-probs are reported *before* logit_bias and the sampled token's own log-prob
              is always included (llama.cpp's server): force each token with a large bias and
              read its unbiased log-prob. Queries: V.
"gap"         no log-probs at all: bisect the bias that makes each token the greedy choice;
              that is its logit gap to the top token (Morris et al. 2023, sec. 5), to within
              `tolerance`. Queries: 1 + (V-1) * ceil(log2(bias / tolerance)).
"""

from __future__ import annotations

import math

import torch

from ...errors import TargetError
from .transport import TokenKeys, Transport

STRATEGIES = ("bias-block", "force", "gap")
DEFAULT_BIAS = 100.0  # OpenAI's maximum |logit_bias|
DEFAULT_TOLERANCE = 1e-3  # nats, for the "gap" strategy's bisection


def bisection_steps(bias: float, tolerance: float) -> int:
    """Queries the "gap" strategy asks per token to pin its gap to within `tolerance`."""
    return math.ceil(math.log2(bias / tolerance))


def query_cost(strategy: str, top_k: int, n_tokens: int, bias: float, tolerance: float) -> int:
    """Queries one distribution of `n_tokens` entries costs (ids with unique keys)."""
    if strategy == "bias-block":
        return 1 + math.ceil((n_tokens - 1) / (top_k - 1))
    if strategy == "force":
        return n_tokens
    return 1 + (n_tokens - 1) * bisection_steps(bias, tolerance)


class Recovery:
    """Runs a strategy through a transport; tokens are named as `keys` says."""

    def __init__(
        self, transport: Transport, keys: TokenKeys, vocab_size: int, bias: float, tolerance: float
    ):
        self.transport, self.keys = transport, keys
        self.vocab_size, self.bias, self.tolerance = vocab_size, bias, tolerance

    def run(
        self, strategy: str, prompt: str, wanted: list[int], k: int
    ) -> tuple[torch.Tensor, int]:
        """Log-probs of `wanted` after `prompt` (NaN elsewhere) and how many stayed unresolved."""
        if strategy == "bias-block":
            return self.bias_block(prompt, wanted, k)
        if strategy == "force":
            return self.force(prompt, wanted, k)
        return self.gap(prompt, wanted)

    def bias_block(self, prompt: str, wanted: list[int], k: int) -> tuple[torch.Tensor, int]:
        tr, ids = self.transport, self.keys.ids
        ref = tr.ask(tr.request(prompt, None, k))
        # The reference is the likeliest token whose name is its own: a legacy completion's
        # top token is often a partial UTF-8 byte, shown as U+FFFD like a hundred others.
        named = [(ids(key)[0], lp) for key, lp in ref.top if len(ids(key)) == 1]
        keys = self.keys.keys
        relative = not named
        if named:
            r, lp_r = named[0]
        elif len(wanted) == self.vocab_size:
            # Every top entry is shared (all U+FFFD): read each token against a named one
            # whose own log-prob is unknown, then normalise over the whole vocabulary.
            r = next((t for t in wanted if len(ids(keys[t])) == 1), None)
            if r is None:
                raise TargetError("no token has a name of its own; nothing to read against")
            lp_r = 0.0
        else:
            raise TargetError(
                f"none of the {len(ref.top)} top tokens has a name of its own, so a partial "
                "recovery has no reference log-prob; recover the whole vocabulary"
            )
        blocks = _blocks([t for t in wanted if t != r], k - 1, keys, keys[r])
        replies = tr.ask_many(
            [tr.request(prompt, {r: self.bias, **dict.fromkeys(b, self.bias)}, k) for b in blocks],
            "bias-block",
        )
        vec = torch.full((self.vocab_size,), float("nan"))
        vec[r] = lp_r
        unresolved = 0
        for block, reply in zip(blocks, replies, strict=True):
            entries = list(reply.top)
            if reply.chosen_logprob is not None:
                entries.append((reply.chosen, reply.chosen_logprob))
            members = {r, *block}
            shown: dict[int, float] = {}
            for key, lp in entries:
                # An entry names one biased token, unless its name is shared within the block.
                hits = members.intersection(ids(key))
                if len(hits) == 1:
                    shown.setdefault(hits.pop(), lp)
            ref_lp = shown.get(r)
            for t in block:
                lp_t = shown.get(t)
                if lp_t is None or ref_lp is None:
                    vec[t] = lp_r - self.bias  # beyond the bias's reach: at most this
                    unresolved += 1
                else:
                    vec[t] = lp_r + lp_t - ref_lp
        if relative:
            vec = vec - torch.logsumexp(vec.double(), 0).float()
        return vec, unresolved

    def force(self, prompt: str, wanted: list[int], k: int) -> tuple[torch.Tensor, int]:
        tr = self.transport
        replies = tr.ask_many(
            [tr.request(prompt, {t: self.bias}, max(k, 1)) for t in wanted], "force"
        )
        vec = torch.full((self.vocab_size,), float("nan"))
        unresolved = 0
        for t, reply in zip(wanted, replies, strict=True):
            if t in self.keys.ids(reply.chosen) and reply.chosen_logprob is not None:
                vec[t] = reply.chosen_logprob
            else:
                unresolved += 1
                vec[t] = reply.top[0][1] - self.bias if reply.top else -self.bias
        return vec, unresolved

    def gap(self, prompt: str, wanted: list[int]) -> tuple[torch.Tensor, int]:
        tr, ids = self.transport, self.keys.ids
        top_reply = tr.ask(tr.request(prompt, None, None, logprobs=False))
        top_ids = ids(top_reply.chosen)
        if not top_ids:
            raise TargetError(f"cannot identify the generated token {top_reply.chosen!r}")
        top = top_ids[0]
        others = [t for t in wanted if t != top]
        # Tokens that share the top token's visible text cannot be told apart from it.
        ambiguous = set(top_ids) if len(top_ids) > 1 else set()
        steps = bisection_steps(self.bias, self.tolerance)

        def bisect(t: int) -> float | None:
            if t in ambiguous:
                return None
            lo, hi, reached = 0.0, self.bias, False
            for _ in range(steps):
                mid = (lo + hi) / 2
                reply = tr.ask(tr.request(prompt, {t: mid}, None, logprobs=False))
                if t in ids(reply.chosen):
                    hi, reached = mid, True
                else:
                    lo = mid
            return (lo + hi) / 2 if reached else None

        gaps = tr.map(bisect, others, "gap bisection")
        unresolved = sum(g is None for g in gaps)
        logits = torch.full((self.vocab_size,), float("nan"), dtype=torch.float64)
        logits[top] = 0.0
        for t, g in zip(others, gaps, strict=True):
            logits[t] = -(self.bias if g is None else g)
        known = logits[~torch.isnan(logits)]
        if len(wanted) < self.vocab_size:
            # A partial recovery cannot normalise; report log-probs relative to the top token.
            return logits.float(), unresolved
        return (logits - torch.logsumexp(known, 0)).float(), unresolved


def _blocks(tokens: list[int], size: int, keys: list[str], reserved: str) -> list[list[int]]:
    """Split tokens into blocks of `size` whose keys are distinct (and not `reserved`), so every
    entry of an answer names exactly one token."""
    blocks: list[list[int]] = []
    used: list[set[str]] = []
    open_from = 0
    for t in tokens:
        key = keys[t]
        i = open_from
        while i < len(blocks) and (len(blocks[i]) >= size or key in used[i]):
            i += 1
        if i == len(blocks):
            blocks.append([])
            used.append({reserved})
        blocks[i].append(t)
        used[i].add(key)
        while open_from < len(blocks) and len(blocks[open_from]) >= size:
            open_from += 1
    return blocks
