"""Full next-token distributions from any OpenAI-compatible endpoint, by search over logit_bias.

APIs show at most the top-k log-probs, but most accept `logit_bias`. A probe query tells which
of three behaviours an endpoint has ("bias-block", "force" or "gap": see `strategies`), and the
matching strategy recovers every entry. Queries go through `transport` (disk cache, rate limit,
retries, budget). Every name of those two modules that callers used from here is re-exported.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import TargetError
from ..base import (
    DEFAULT_USER_TURN,
    SYSTEM_MODES,
    Target,
    TargetFingerprint,
    check_prompt_options,
)
from ..subset import RESIDUAL_TOLERANCE
from .strategies import (
    DEFAULT_BIAS,
    DEFAULT_TOLERANCE,
    STRATEGIES,
    Recovery,
    bisection_steps,
    query_cost,
)
from .transport import (
    QueryBudgetExceeded,
    QueryCache,
    RateLimiter,
    Reply,
    TokenKeys,
    Transport,
    load_tokenizer,
)

__all__ = [
    "DEFAULT_BIAS",
    "DEFAULT_TOLERANCE",
    "DEFAULT_USER_TURN",
    "PROBE_PROMPT",
    "STRATEGIES",
    "TOP_K_TRIES",
    "OpenAITarget",
    "QueryBudgetExceeded",
    "QueryCache",
    "RateLimiter",
    "RecoveryReport",
    "Reply",
    "load_tokenizer",
    "parse_openai_spec",
    "resolve_api_target",
]

logger = logging.getLogger(__name__)

# What the probe asks for, largest first, when top_k is not given: an endpoint capped at 3
# still gets bias-block (~V/2 queries) rather than gap (~17 V).
TOP_K_TRIES = (20, 10, 5, 4, 3, 2, 1)
PROBE_PROMPT = "Hello"
FULL_CHECK_TOLERANCE = 1e-3  # nats: a reconstruction's error on tokens outside the subset
_SPEC = re.compile(r"^openai:(https?://[^/]+(?:/[^:]*)?):(.+)$")


def parse_openai_spec(spec: str) -> tuple[str, str]:
    """'openai:http://127.0.0.1:8000/v1:MODEL' -> (base URL, model)."""
    m = _SPEC.match(spec)
    if m is None:
        raise TargetError(
            f"bad API target {spec!r}; write openai:BASE_URL:MODEL, "
            "e.g. openai:http://127.0.0.1:8000/v1:smollm2-135m-instruct"
        )
    return m.group(1), m.group(2)


@dataclass
class RecoveryReport:
    strategy: str
    top_k: int
    queries: int  # answered by the endpoint for this distribution
    cached: int  # answered from the disk cache
    unresolved: int  # tokens the bias could not reach (gap > bias): set to the bound


class OpenAITarget(Target):
    """A `Target` behind an OpenAI-compatible API; full distributions by logit_bias search."""

    @property
    def max_steps(self) -> int:
        """One: the API recovers the first position's distribution only."""
        return 1

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        tokenizer=None,
        api_key: str | None = None,
        mode: str = "user",
        system_prompt: str | None = None,
        user_turn: str | None = None,
        strategy: str = "auto",
        top_k: int | None = None,
        bias: float = DEFAULT_BIAS,
        tolerance: float = DEFAULT_TOLERANCE,
        concurrency: int = 8,
        rate_limit: float | None = None,
        max_retries: int = 6,
        timeout: float = 60.0,
        cache_path: str | Path | None = None,
        vocab_size: int | None = None,
        max_queries: int | None = None,
        progress: bool = False,
    ):
        if strategy not in ("auto", *STRATEGIES):
            raise TargetError(f"unknown strategy {strategy!r}; choose auto or {STRATEGIES}")
        check_prompt_options(mode, system_prompt, user_turn)
        user_turn = DEFAULT_USER_TURN if user_turn is None else user_turn
        self.tokenizer = (
            load_tokenizer(model, None)
            if tokenizer is None
            else (load_tokenizer(model, tokenizer) if isinstance(tokenizer, str) else tokenizer)
        )
        vocab = int(vocab_size or len(self.tokenizer))
        self.bias, self.tolerance = float(bias), float(tolerance)
        self.requested_strategy, self.requested_top_k = strategy, top_k
        self.transport = Transport(
            base_url,
            model,
            mode=mode,
            system_prompt=system_prompt,
            user_turn=user_turn,
            api_key=api_key,
            concurrency=concurrency,
            rate_limit=rate_limit,
            max_retries=max_retries,
            timeout=timeout,
            cache_path=cache_path,
            max_queries=max_queries,
            progress=progress,
        )
        self.base_url, self.model, self.mode = self.transport.base_url, model, mode
        self.system_prompt, self.user_turn = system_prompt, user_turn
        self.probe_queries = 0
        self.decoder = None  # set by use_basis: full vectors from a token subset
        self.check_ids: list[int] = []
        self.subset_report: dict = {}
        self._behaviour: tuple[str, int] | None = None
        from ..hf import hash_tokenizer

        self.fingerprint = TargetFingerprint(
            name=self.transport.name,
            weights_sha256=f"api:{model}",
            tokenizer_sha256=hash_tokenizer(self.tokenizer),
            vocab_size=vocab,
            mode=mode,
            # The setting that shapes the chat: user mode's system prompt, or the system
            # modes' user turn where not the default (older stores name none).
            template=f"api-{'completions' if mode == 'raw' else 'chat'}:{mode}"
            + (f":{system_prompt}" if system_prompt else "")
            + (f":{user_turn}" if mode in SYSTEM_MODES and user_turn != DEFAULT_USER_TURN else ""),
            dtype="api",
        )
        self.keys = TokenKeys(self.tokenizer, vocab, mode)
        self.recovery = Recovery(self.transport, self.keys, vocab, self.bias, self.tolerance)

    # ------------------------------------------------------------------ transport state
    @property
    def sent(self) -> int:
        """Queries the endpoint answered, over this object's life."""
        return self.transport.sent

    @property
    def cache_hits(self) -> int:
        return self.transport.cache_hits

    @property
    def refused(self) -> int:
        """Queries the endpoint answered with an error (not cached)."""
        return self.transport.refused

    @property
    def cache(self) -> QueryCache:
        return self.transport.cache

    @property
    def max_queries(self) -> int | None:
        return self.transport.max_queries

    @property
    def client(self):
        """The official `openai.OpenAI` client the queries go through."""
        return self.transport.client

    @property
    def limiter(self) -> RateLimiter:
        return self.transport.limiter

    @property
    def concurrency(self) -> int:
        return self.transport.concurrency

    # ------------------------------------------------------------------ Target interface
    def count_tokens(self, prompts: Sequence[str]) -> list[int]:
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]

    def next_token_logprobs(self, prompts: Sequence[str], steps: int | None = None) -> torch.Tensor:
        if isinstance(prompts, str):
            raise TypeError("next_token_logprobs takes a list of prompts, not a single string")
        if steps not in (None, 1):
            raise TargetError("API targets recover the first position only; use steps=1")
        if self.decoder is not None:
            rows = [self.reconstruct(p) for p in prompts]
        else:
            rows = [self.recover(p)[0] for p in prompts]
        out = torch.stack(rows) if rows else torch.empty(0, self.vocab_size)
        return out if steps is None else out[:, None]

    # ------------------------------------------------------------------ requests
    def _request(
        self,
        prompt: str,
        bias: dict[int, float] | None,
        top: int | None,
        logprobs: bool = True,
    ) -> dict:
        """The request body (also the cache key) for one first-token query."""
        return self.transport.request(prompt, bias, top, logprobs)

    def _ask(self, request: dict) -> Reply:
        """Answer one request, from the cache or the endpoint."""
        return self.transport.ask(request)

    def token_ids_named(self, token: str) -> list[int]:
        """Ids whose token string is `token` (several when byte-level strings collide)."""
        return self.keys.ids_of_text.get(token, [])

    def _ids(self, key: str) -> list[int]:
        return self.keys.ids(key)

    def reported_top(self, prompt: str, k: int) -> dict[int, float]:
        """The endpoint's own top-k first-token log-probs for `prompt`, no bias: {id: lp}.

        Entries whose token string several ids share are left out. Used to check recovered
        values against what the endpoint reports directly.
        """
        reply = self._ask(self._request(prompt, None, k))
        return {ids[0]: lp for key, lp in reply.top if len(ids := self._ids(key)) == 1}

    # ------------------------------------------------------------------ probing
    def probe(self) -> tuple[str, int]:
        """Which strategy this endpoint needs and the top-k it shows; asked once, then kept."""
        if self._behaviour is not None:
            return self._behaviour
        before = self.sent
        try:
            self._behaviour = self._probe()
        finally:
            self.probe_queries += self.sent - before
        return self._behaviour

    def _probe(self) -> tuple[str, int]:
        forced = self.requested_strategy if self.requested_strategy != "auto" else None
        ref, k = None, 0
        for want in (self.requested_top_k,) if self.requested_top_k else TOP_K_TRIES:
            request = self._request(PROBE_PROMPT, None, want)
            self.transport.check_cache_current(request)  # a cached answer still current?
            try:
                ref = self._ask(request)
            except TargetError as exc:
                if self.requested_top_k:  # asked for by name: say why it cannot be had
                    raise TargetError(f"the endpoint refused top_logprobs={want}: {exc}") from exc
                continue
            if ref.top:
                k = min(want, len(ref.top))
                break
        if forced == "bias-block" and k < 2:
            raise TargetError(
                f"bias-block needs at least 2 top log-probs; the endpoint shows {k} "
                f"(use --api-strategy force or gap, or auto)"
            )
        if forced:
            return forced, max(k, 1)
        if not ref or not ref.top:
            self._check_bias_works()
            return "gap", 0
        r_ids = self._ids(ref.top[0][0])
        candidates = [self._ids(key) for key, _ in ref.top[1:]] or [[]]
        u = (
            candidates[-1][0]
            if candidates[-1]
            else next(
                i
                for i in range(self.vocab_size)
                if i not in r_ids and len(self._ids(self.keys.keys[i])) == 1
            )
        )
        forced_reply = self._ask(self._request(PROBE_PROMPT, {u: self.bias}, max(k, 1)))
        if u not in self._ids(forced_reply.chosen):
            raise TargetError(
                f"the endpoint ignores logit_bias (token {u} biased by {self.bias} was not "
                f"generated), so only its top-{k} log-probs can be read, not the distribution"
            )
        if forced_reply.chosen_logprob is None:
            return "gap", k
        if forced_reply.chosen_logprob > ref.top[0][1] + 1e-6:
            # The forced token now looks likelier than the unbiased favourite: after-bias.
            return ("bias-block" if k >= 2 else "gap"), k
        return "force", k

    def _check_bias_works(self) -> None:
        top = self._ask(self._request(PROBE_PROMPT, None, None, logprobs=False))
        top_ids = self._ids(top.chosen)
        u = next(i for i in range(self.vocab_size) if i not in top_ids and self.keys.unique_text(i))
        reply = self._ask(self._request(PROBE_PROMPT, {u: self.bias}, None, logprobs=False))
        if u not in self._ids(reply.chosen):
            raise TargetError(
                "the endpoint shows no log-probs and ignores logit_bias: nothing can be recovered"
            )

    # ------------------------------------------------------------------ recovery
    def query_cost(self, strategy: str, top_k: int, n_tokens: int | None = None) -> int:
        """Queries one full distribution costs under a strategy (ids with unique keys)."""
        v = self.vocab_size if n_tokens is None else n_tokens
        return query_cost(strategy, top_k, v, self.bias, self.tolerance)

    @property
    def bisection_steps(self) -> int:
        return bisection_steps(self.bias, self.tolerance)

    def recover(
        self, prompt: str, token_ids: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, RecoveryReport]:
        """The full next-token log-prob vector after `prompt` (float32 [V]) and its cost.

        With `token_ids`, only those entries are recovered (the rest are NaN): for sampling
        a few entries of an expensive endpoint."""
        if not prompt:
            raise TargetError("the prompt is empty")
        strategy, k = self.probe()
        sent, hits = self.sent, self.cache_hits
        wanted = list(range(self.vocab_size)) if token_ids is None else sorted(set(token_ids))
        vec, unresolved = self.recovery.run(strategy, prompt, wanted, k)
        report = RecoveryReport(strategy, k, self.sent - sent, self.cache_hits - hits, unresolved)
        return vec, report

    # ------------------------------------------------------------------ token subsets
    def observe_subset(self, prompts: Sequence[str], subset, steps: int | None = None):
        """Subset observations float32 `[n, 1, |S|]` (`targets/subset.py`): only S is asked
        for, about |S| / (k - 1) queries per prompt with bias-block. TargetError naming the
        difference when the subset belongs to another tokenizer or vocabulary."""
        if steps not in (None, 1):
            raise TargetError("API targets observe the first position only; use steps=1")
        self.check_subset(subset)
        rows = []
        for p in prompts:
            vec, report = self.recover(p, subset.ids)
            if report.unresolved:
                raise TargetError(
                    f"{report.unresolved} of the {subset.size} subset tokens were beyond the "
                    f"bias's reach ({self.bias}) for prompt {p[:60]!r}: their log-probs are "
                    "only bounded, not known"
                )
            rows.append(subset.observe(vec))
        out = torch.stack(rows) if rows else torch.empty(0, subset.size)
        return out[:, None].numpy()

    def collection_report(self) -> dict:
        """What a store's manifest records about how this endpoint was asked."""
        strategy, k = self.probe()
        out = {
            "endpoint": self.transport.name,
            "strategy": strategy,
            "top_k": k,
            "queries_sent": self.sent,
            "cache_hits": self.cache_hits,
        }
        if self.subset_report:
            out["subset_reconstruction"] = dict(self.subset_report)
        return out

    def check_subset(self, subset) -> None:
        ours = (self.fingerprint.tokenizer_sha256, self.vocab_size)
        if (subset.tokenizer_sha256, subset.vocab_size) != ours:
            raise TargetError(
                f"the token subset ({subset.describe()}) was drawn from another tokenizer or "
                f"vocabulary than {self.fingerprint.describe()}'s"
            )

    def use_basis(self, basis, subset, check_tokens: int | None = None) -> None:
        """Recover full vectors from `subset` alone through `basis` (a white-box copy of the
        model's output layer, or a basis fitted from full vectors): `next_token_logprobs`
        then asks for S plus `check_tokens` extra tokens (default: one query's worth), rebuilds
        the vector from S and compares the extra tokens. A vector that fails the check (a
        quantised or noisy endpoint, a defense, another model) is recovered exactly instead;
        `subset_report` counts both."""
        from ..subset import SubsetDecoder

        self.check_subset(subset)
        self.decoder = SubsetDecoder(subset, basis)
        _, k = self.probe()
        n = check_tokens if check_tokens is not None else max(k - 1, 4)
        rng = torch.Generator().manual_seed(subset.seed + 1)
        inside = set(subset.ids)
        outside = [
            i
            for i in torch.randperm(self.vocab_size, generator=rng).tolist()
            if i not in inside and self.keys.unique_text(i)
        ]
        self.check_ids = sorted(outside[:n])
        self.subset_report = {
            "subset": subset.describe(),
            "check_tokens": len(self.check_ids),
            "reconstructed": 0,
            "fallbacks": 0,
            "max_check_error": 0.0,
            "max_residual": 0.0,
        }

    def reconstruct(self, prompt: str) -> torch.Tensor:
        """One full vector from the subset and the basis, or the exact strategy's when the
        reconstruction fails its checks (see `use_basis`)."""
        subset = self.decoder.subset
        # S on its own (the queries an observation of S already made, answered from the
        # cache), then the few check tokens: about one extra query with bias-block.
        vec, report = self.recover(prompt, subset.ids)
        check, check_report = self.recover(prompt, self.check_ids)
        full, residual = self.decoder.decode(subset.observe(vec).numpy(), tolerance=None)
        full = torch.from_numpy(full)
        ids, s_ids = torch.tensor(self.check_ids), torch.tensor(subset.ids)
        # "gap" reads values relative to the top token: align both sides on S first (zero
        # for strategies that read log-probs themselves).
        offset = float((full[s_ids] - vec[s_ids]).mean())
        error = float((full[ids] - check[ids] - offset).abs().max()) if len(ids) else 0.0
        rep = self.subset_report
        rep["max_residual"] = max(rep["max_residual"], float(residual))
        rep["max_check_error"] = max(rep["max_check_error"], error)
        if (
            report.unresolved
            or check_report.unresolved
            or not error <= FULL_CHECK_TOLERANCE
            or float(residual) > RESIDUAL_TOLERANCE
        ):
            logger.warning(
                "subset reconstruction failed its check for %r (error %.2e nats on %d tokens "
                "outside the subset, residual %.2e): recovering it exactly",
                prompt[:60],
                error,
                len(ids),
                float(residual),
            )
            rep["fallbacks"] += 1
            return self.recover(prompt)[0]
        rep["reconstructed"] += 1
        return full


def resolve_api_target(spec: str, **kwargs) -> OpenAITarget:
    """An OpenAITarget from 'openai:BASE_URL:MODEL' and keyword options."""
    base_url, model = parse_openai_spec(spec)
    return OpenAITarget(base_url, model, **kwargs)
