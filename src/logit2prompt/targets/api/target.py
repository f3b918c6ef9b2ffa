"""Full next-token distributions from any OpenAI-compatible endpoint, by search over logit_bias.

APIs show at most the top-k log-probs, but most accept `logit_bias`. A probe query tells which
of three behaviours an endpoint has, and the matching strategy recovers every entry:

  "bias-block"  log-probs are reported *after* logit_bias (OpenAI-style): bias a reference token
                and k-1 new tokens by the same amount; their reported differences are the
                unbiased differences. Queries per distribution: 1 + ceil((V-1)/(k-1)).
  "force"       log-probs are reported *before* logit_bias and the sampled token's own log-prob
                is always included (llama.cpp's server): force each token with a large bias and
                read its unbiased log-prob. Queries: V.
  "gap"         no log-probs at all: bisect the bias that makes each token the greedy choice;
                that is its logit gap to the top token (Morris et al. 2023, sec. 5), to within
                `tolerance`. Queries: 1 + (V-1) * ceil(log2(bias / tolerance)).

Every answer is cached on disk (keyed by the exact request), so an interrupted recovery resumes
without asking again; requests run concurrently under a rate limit, and the official client
retries 429/5xx answers with exponential backoff.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ...cache import cache_dir
from ...errors import TargetError
from ..base import Target, TargetFingerprint
from ..vocab import token_bytes, token_text

STRATEGIES = ("bias-block", "force", "gap")
DEFAULT_BIAS = 100.0  # OpenAI's maximum |logit_bias|
DEFAULT_TOLERANCE = 1e-3  # nats, for the "gap" strategy's bisection
TOP_K_TRIES = (20, 5, 1)  # what the probe asks for, largest first, when top_k is not given
PROBE_PROMPT = "Hello"
DEFAULT_USER_TURN = "Hello!"
_SPEC = re.compile(r"^openai:(https?://[^/]+(?:/[^:]*)?):(.+)$")


class QueryBudgetExceeded(TargetError):
    """The recovery reached its query budget; rerun to continue from the cache."""


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
class Reply:
    """The parts of one API answer recovery needs, normalised across endpoint styles."""

    chosen: str  # key of the generated token ("" when nothing came back)
    chosen_logprob: float | None
    top: list[tuple[str, float]]  # (key, log-prob) of the first position's top entries


@dataclass
class RecoveryReport:
    strategy: str
    top_k: int
    queries: int  # answered by the endpoint for this distribution
    cached: int  # answered from the disk cache
    unresolved: int  # tokens the bias could not reach (gap > bias): set to the bound


class QueryCache:
    """Request -> normalised reply, in SQLite (safe across threads and killed processes)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT)")
        self._lock = threading.Lock()

    @staticmethod
    def key(request: dict) -> str:
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()

    def get(self, request: dict) -> Reply | None:
        with self._lock:
            row = self._db.execute(
                "SELECT reply FROM replies WHERE key = ?", (self.key(request),)
            ).fetchone()
        if row is None:
            return None
        d = json.loads(row[0])
        return Reply(d["chosen"], d["chosen_logprob"], [tuple(x) for x in d["top"]])

    def put(self, request: dict, reply: Reply) -> None:
        blob = json.dumps(
            {"chosen": reply.chosen, "chosen_logprob": reply.chosen_logprob, "top": reply.top}
        )
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO replies VALUES (?, ?)", (self.key(request), blob)
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]


class RateLimiter:
    """At most `rate` request starts per second across threads (None: unlimited)."""

    def __init__(self, rate: float | None):
        self.interval = 1.0 / rate if rate else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        time.sleep(max(0.0, start - now))


def load_tokenizer(model: str, tokenizer: str | None):
    """The endpoint's tokenizer: given, the embedded default's, or the model id's on the hub."""
    from transformers import AutoTokenizer

    from ..embedded import DEFAULT_TARGET

    if tokenizer is None and model == DEFAULT_TARGET:
        from ..embedded import converted_dir

        tokenizer = str(converted_dir()[0])
    try:
        return AutoTokenizer.from_pretrained(tokenizer or model, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise TargetError(
            f"API recovery needs the endpoint's tokenizer (logit_bias speaks token ids); "
            f"could not load {tokenizer or model!r}: {exc}. Pass --tokenizer DIR_OR_HUB_ID"
        ) from exc


class OpenAITarget(Target):
    """A `Target` behind an OpenAI-compatible API; full distributions by logit_bias search."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        tokenizer=None,
        api_key: str | None = None,
        mode: str = "user",
        system_prompt: str | None = None,
        user_turn: str = DEFAULT_USER_TURN,
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
        import openai

        if strategy not in ("auto", *STRATEGIES):
            raise TargetError(f"unknown strategy {strategy!r}; choose auto or {STRATEGIES}")
        if mode not in ("raw", "user", "system"):
            raise TargetError(f"unknown prompt mode {mode!r}")
        self.base_url, self.model, self.mode = base_url.rstrip("/"), model, mode
        self.system_prompt, self.user_turn = system_prompt, user_turn
        self.tokenizer = (
            load_tokenizer(model, None)
            if tokenizer is None
            else (load_tokenizer(model, tokenizer) if isinstance(tokenizer, str) else tokenizer)
        )
        vocab = int(vocab_size or len(self.tokenizer))
        self.bias, self.tolerance = float(bias), float(tolerance)
        self.requested_strategy, self.requested_top_k = strategy, top_k
        self.progress = progress
        self.max_queries = max_queries
        # The official client retries 408/409/429/5xx and connection errors with exponential
        # backoff, honouring Retry-After.
        self.client = openai.OpenAI(
            base_url=self.base_url,
            api_key=api_key or "none",
            max_retries=max_retries,
            timeout=timeout,
        )
        self.concurrency = max(1, int(concurrency))
        self.limiter = RateLimiter(rate_limit)
        name = f"openai:{self.base_url}:{model}"
        if cache_path is None:
            slug = hashlib.sha256(name.encode()).hexdigest()[:16]
            cache_path = cache_dir("api") / f"{slug}.sqlite"
        self.cache = QueryCache(Path(cache_path))
        self.sent = 0  # queries the endpoint answered, over this object's life
        self.cache_hits = 0
        self.refused = 0  # queries the endpoint answered with an error (not cached)
        self.probe_queries = 0
        self._count_lock = threading.Lock()
        self._behaviour: tuple[str, int] | None = None
        from ..hf import hash_tokenizer

        self.fingerprint = TargetFingerprint(
            name=name,
            weights_sha256=f"api:{model}",
            tokenizer_sha256=hash_tokenizer(self.tokenizer),
            vocab_size=vocab,
            mode=mode,
            template=f"api-{'completions' if mode == 'raw' else 'chat'}:{mode}"
            + (f":{system_prompt}" if system_prompt else ""),
            dtype="api",
        )
        raw = token_bytes(self.tokenizer, vocab)
        # Chat answers carry each token's bytes (unique per id); legacy completions only the
        # string, which several ids can share ("\ufffd" for partial UTF-8 bytes).
        self._keys = [r.hex() if mode != "raw" else token_text(r) for r in raw]
        self._text_keys = [token_text(r) for r in raw]
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos < vocab:
            self._text_keys[eos] = ""  # the stop token never appears in returned text
        self._ids_of: dict[str, list[int]] = {}
        for i, k in enumerate(self._keys):
            self._ids_of.setdefault(k, []).append(i)
        self._ids_of_text: dict[str, list[int]] = {}
        for i, k in enumerate(self._text_keys):
            self._ids_of_text.setdefault(k, []).append(i)

    # ------------------------------------------------------------------ Target interface
    def count_tokens(self, prompts: Sequence[str]) -> list[int]:
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]

    def next_token_logprobs(self, prompts: Sequence[str], steps: int | None = None) -> torch.Tensor:
        if isinstance(prompts, str):
            raise TypeError("next_token_logprobs takes a list of prompts, not a single string")
        if steps not in (None, 1):
            raise TargetError("API targets recover the first position only; use steps=1")
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
        body: dict = {"model": self.model, "max_tokens": 1, "temperature": 0.0, "seed": 0}
        if bias:
            body["logit_bias"] = {str(t): round(float(b), 6) for t, b in sorted(bias.items())}
        if self.mode == "raw":
            body["prompt"] = prompt
            if logprobs:
                body["logprobs"] = top
            return {"endpoint": "completions", **body}
        messages = [{"role": "user", "content": prompt}]
        if self.mode == "user" and self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        if self.mode == "system":
            messages = [
                {"role": "system", "content": prompt},
                {"role": "user", "content": self.user_turn},
            ]
        body["messages"] = messages
        if logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = top
        return {"endpoint": "chat", **body}

    def _ask(self, request: dict) -> Reply:
        """Answer one request, from the cache or the endpoint."""
        cached = self.cache.get(request)
        if cached is not None:
            with self._count_lock:
                self.cache_hits += 1
            return cached
        with self._count_lock:
            if self.max_queries is not None and self.sent >= self.max_queries:
                raise QueryBudgetExceeded(
                    f"query budget of {self.max_queries} reached; rerun to resume from the cache"
                )
            self.sent += 1
        self.limiter.wait()
        reply = self._call(request)
        self.cache.put(request, reply)
        return reply

    def _call(self, request: dict) -> Reply:
        import openai

        body = {k: v for k, v in request.items() if k != "endpoint"}
        try:
            if request["endpoint"] == "chat":
                resp = self.client.chat.completions.create(**body)
            else:
                resp = self.client.completions.create(**body)
        except openai.APIStatusError as exc:
            with self._count_lock:
                self.refused += 1
            raise TargetError(
                f"the endpoint {self.base_url} refused a query ({exc.status_code}): {exc.message}"
            ) from exc
        except openai.APIConnectionError as exc:
            raise TargetError(f"cannot reach {self.base_url}: {exc}") from exc
        choice = resp.choices[0]
        if request["endpoint"] == "chat":
            content = (choice.logprobs.content or []) if choice.logprobs else []
            if content:
                first = content[0]
                top = [(self._entry_key(e), e.logprob) for e in (first.top_logprobs or [])]
                return Reply(self._entry_key(first), first.logprob, top)
            return Reply("t:" + (choice.message.content or ""), None, [])
        lp = choice.logprobs
        if lp and lp.tokens:
            top = list((lp.top_logprobs[0] or {}).items()) if lp.top_logprobs else []
            return Reply(lp.tokens[0], lp.token_logprobs[0], top)
        return Reply("t:" + (choice.text or ""), None, [])

    def _entry_key(self, entry) -> str:
        raw = getattr(entry, "bytes", None)
        if self.mode != "raw" and raw is not None:
            return bytes(raw).hex()
        # No bytes (llama.cpp): the string, which several ids can share.
        return entry.token if self.mode == "raw" else "s:" + entry.token

    def token_ids_named(self, token: str) -> list[int]:
        """Ids whose token string is `token` (several when byte-level strings collide)."""
        return self._ids_of_text.get(token, [])

    def _ids(self, key: str) -> list[int]:
        # "t:" only the reply text came back; "s:" a token string without bytes.
        if key.startswith(("t:", "s:")):
            return self._ids_of_text.get(key[2:], [])
        return self._ids_of.get(key, [])

    def reported_top(self, prompt: str, k: int) -> dict[int, float]:
        """The endpoint's own top-k first-token log-probs for `prompt`, no bias: {id: lp}.

        Entries whose token string several ids share are left out. Used to check recovered
        values against what the endpoint reports directly.
        """
        reply = self._ask(self._request(prompt, None, k))
        return {ids[0]: lp for key, lp in reply.top if len(ids := self._ids(key)) == 1}

    def _ask_many(self, requests: list[dict], desc: str) -> list[Reply]:
        if not requests:
            return []
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(self._ask, r) for r in requests]
            bar = _progress(len(futures), desc, self.progress)
            out = []
            try:
                for f in futures:
                    out.append(f.result())
                    bar.update()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            finally:
                bar.close()
        return out

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
            try:
                ref = self._ask(self._request(PROBE_PROMPT, None, want))
            except TargetError:
                continue
            if ref.top:
                k = min(want, len(ref.top))
                break
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
                if i not in r_ids and len(self._ids(self._keys[i])) == 1
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
        u = next(i for i in range(self.vocab_size) if i not in top_ids and self._unique_text(i))
        reply = self._ask(self._request(PROBE_PROMPT, {u: self.bias}, None, logprobs=False))
        if u not in self._ids(reply.chosen):
            raise TargetError(
                "the endpoint shows no log-probs and ignores logit_bias: nothing can be recovered"
            )

    def _unique_text(self, i: int) -> bool:
        return len(self._ids_of_text.get(self._text_keys[i], [])) == 1

    # ------------------------------------------------------------------ recovery
    def query_cost(self, strategy: str, top_k: int, n_tokens: int | None = None) -> int:
        """Queries one full distribution costs under a strategy (ids with unique keys)."""
        v = self.vocab_size if n_tokens is None else n_tokens
        if strategy == "bias-block":
            return 1 + math.ceil((v - 1) / (top_k - 1))
        if strategy == "force":
            return v
        return 1 + (v - 1) * self.bisection_steps

    @property
    def bisection_steps(self) -> int:
        return math.ceil(math.log2(self.bias / self.tolerance))

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
        if strategy == "bias-block":
            vec, unresolved = self._bias_block(prompt, wanted, k)
        elif strategy == "force":
            vec, unresolved = self._force(prompt, wanted, k)
        else:
            vec, unresolved = self._gap(prompt, wanted)
        report = RecoveryReport(strategy, k, self.sent - sent, self.cache_hits - hits, unresolved)
        return vec, report

    def _bias_block(self, prompt: str, wanted: list[int], k: int) -> tuple[torch.Tensor, int]:
        ref = self._ask(self._request(prompt, None, k))
        r_ids = self._ids(ref.top[0][0])
        if len(r_ids) != 1:
            raise TargetError("the top token's name is ambiguous; cannot use it as reference")
        r, lp_r = r_ids[0], ref.top[0][1]
        blocks = _blocks([t for t in wanted if t != r], k - 1, self._keys, self._keys[r])
        replies = self._ask_many(
            [
                self._request(prompt, {r: self.bias, **dict.fromkeys(b, self.bias)}, k)
                for b in blocks
            ],
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
                hits = members.intersection(self._ids(key))
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
        return vec, unresolved

    def _force(self, prompt: str, wanted: list[int], k: int) -> tuple[torch.Tensor, int]:
        replies = self._ask_many(
            [self._request(prompt, {t: self.bias}, max(k, 1)) for t in wanted], "force"
        )
        vec = torch.full((self.vocab_size,), float("nan"))
        unresolved = 0
        floor = None
        for t, reply in zip(wanted, replies, strict=True):
            if t in self._ids(reply.chosen) and reply.chosen_logprob is not None:
                vec[t] = reply.chosen_logprob
            else:
                unresolved += 1
                floor = reply.top[0][1] - self.bias if reply.top else -self.bias
                vec[t] = floor
        return vec, unresolved

    def _gap(self, prompt: str, wanted: list[int]) -> tuple[torch.Tensor, int]:
        top_reply = self._ask(self._request(prompt, None, None, logprobs=False))
        top_ids = self._ids(top_reply.chosen)
        if not top_ids:
            raise TargetError(f"cannot identify the generated token {top_reply.chosen!r}")
        top = top_ids[0]
        others = [t for t in wanted if t != top]
        # Tokens that share the top token's visible text cannot be told apart from it.
        ambiguous = set(top_ids) if len(top_ids) > 1 else set()

        def bisect(t: int) -> float | None:
            if t in ambiguous:
                return None
            lo, hi, reached = 0.0, self.bias, False
            for _ in range(self.bisection_steps):
                mid = (lo + hi) / 2
                reply = self._ask(self._request(prompt, {t: mid}, None, logprobs=False))
                if t in self._ids(reply.chosen):
                    hi, reached = mid, True
                else:
                    lo = mid
            return (lo + hi) / 2 if reached else None

        with ThreadPoolExecutor(self.concurrency) as pool:
            bar = _progress(len(others), "gap bisection", self.progress)
            gaps = []
            for g in pool.map(bisect, others):
                gaps.append(g)
                bar.update()
            bar.close()
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


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def resolve_api_target(spec: str, **kwargs) -> OpenAITarget:
    """An OpenAITarget from 'openai:BASE_URL:MODEL' and keyword options."""
    base_url, model = parse_openai_spec(spec)
    return OpenAITarget(base_url, model, **kwargs)
