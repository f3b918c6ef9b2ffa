"""Talking to an OpenAI-compatible endpoint: request bodies, cached and counted queries.

Every answer is cached on disk (keyed by the exact request), so an interrupted recovery resumes
without asking again; requests run concurrently under a rate limit, and the official client
retries 429/5xx answers with exponential backoff. Replies are normalised to token *keys*
(`TokenKeys` maps them back to ids), whatever the endpoint style.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ...cache import cache_dir
from ...errors import TargetError
from ..base import DEFAULT_USER_TURN, SYSTEM_MODES, system_message
from ..vocab import token_bytes, token_text

logger = logging.getLogger(__name__)

RAW = "r:"  # marks a legacy completion's token string in a reply key
T = TypeVar("T")
R = TypeVar("R")


class QueryBudgetExceeded(TargetError):
    """The recovery reached its query budget; rerun to continue from the cache."""


class EndpointUnreachable(TargetError):
    """The endpoint could not be reached (after the client's retries)."""


@dataclass
class Reply:
    """The parts of one API answer recovery needs, normalised across endpoint styles."""

    chosen: str  # key of the generated token ("" when nothing came back)
    chosen_logprob: float | None
    top: list[tuple[str, float]]  # (key, log-prob) of the first position's top entries

    def matches(self, other: Reply, tolerance: float) -> bool:
        """The same tokens, with log-probs within `tolerance` nats."""
        mine = [self.chosen_logprob] + [lp for _, lp in self.top]
        theirs = [other.chosen_logprob] + [lp for _, lp in other.top]
        return (
            (self.chosen, [k for k, _ in self.top]) == (other.chosen, [k for k, _ in other.top])
            and (self.chosen_logprob is None) == (other.chosen_logprob is None)
            and all(a is None or abs(a - b) <= tolerance for a, b in zip(mine, theirs, strict=True))
        )


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
        if request.get("endpoint") == "completions":
            # Legacy completions' replies carry RAW-marked keys since this salt: an older
            # cache's unmarked ones are asked again rather than misread.
            request = {**request, "_keys": RAW}
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


class TokenKeys:
    """Token id <-> the key a reply names it by.

    Chat answers carry each token's bytes (unique per id); legacy completions only the string,
    which several ids can share ("\\ufffd" for partial UTF-8 bytes).
    """

    def __init__(self, tokenizer, vocab: int, mode: str):
        raw = token_bytes(tokenizer, vocab)
        self.keys = [r.hex() if mode != "raw" else RAW + token_text(r) for r in raw]
        self.text_keys = [token_text(r) for r in raw]
        eos = tokenizer.eos_token_id
        if eos is not None and eos < vocab:
            self.text_keys[eos] = ""  # the stop token never appears in returned text
        self.ids_of: dict[str, list[int]] = {}
        for i, k in enumerate(self.keys):
            self.ids_of.setdefault(k, []).append(i)
        self.ids_of_text: dict[str, list[int]] = {}
        for i, k in enumerate(self.text_keys):
            self.ids_of_text.setdefault(k, []).append(i)

    def ids(self, key: str) -> list[int]:
        """The ids a reply key can name (several when their visible strings collide)."""
        # "t:" only the reply text came back; "s:" a token string without bytes; "r:" a
        # legacy completion's token string (marked too, or a token "t:x" would read as text).
        if key.startswith(("t:", "s:")):
            return self.ids_of_text.get(key[2:], [])
        return self.ids_of.get(key, [])

    def unique_text(self, i: int) -> bool:
        return len(self.ids_of_text.get(self.text_keys[i], [])) == 1


class Transport:
    """Cached, counted, rate-limited first-token queries to one endpoint and model."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        mode: str = "user",
        system_prompt: str | None = None,
        user_turn: str = DEFAULT_USER_TURN,
        api_key: str | None = None,
        concurrency: int = 8,
        rate_limit: float | None = None,
        max_retries: int = 6,
        timeout: float = 60.0,
        cache_path: str | Path | None = None,
        max_queries: int | None = None,
        progress: bool = False,
    ):
        import openai

        self.base_url, self.model, self.mode = base_url.rstrip("/"), model, mode
        self.system_prompt, self.user_turn = system_prompt, user_turn
        self.progress = progress
        if max_queries is not None and max_queries < 1:
            raise TargetError(f"the query budget must be at least 1, got {max_queries}")
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
        self.name = f"openai:{self.base_url}:{model}"
        if cache_path is None:
            slug = hashlib.sha256(self.name.encode()).hexdigest()[:16]
            cache_path = cache_dir("api") / f"{slug}.sqlite"
        self.cache = QueryCache(Path(cache_path))
        self.sent = 0  # queries sent to the endpoint over this object's life, refused ones too
        self.cache_hits = 0
        self.refused = 0  # queries the endpoint answered with an error (not cached)
        self._count_lock = threading.Lock()

    def request(
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
        if self.mode in SYSTEM_MODES:
            messages = [
                {"role": "system", "content": system_message(prompt, self.mode)},
                {"role": "user", "content": self.user_turn},
            ]
        body["messages"] = messages
        if logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = top
        return {"endpoint": "chat", **body}

    def ask(self, request: dict) -> Reply:
        """Answer one request, from the cache or the endpoint."""
        cached = self.cache.get(request)
        if cached is not None:
            with self._count_lock:
                self.cache_hits += 1
            return cached
        reply = self._send(request)
        self.cache.put(request, reply)
        return reply

    def _send(self, request: dict) -> Reply:
        """Ask the endpoint itself: within the query budget, counted, rate-limited."""
        with self._count_lock:
            if self.max_queries is not None and self.sent >= self.max_queries:
                raise QueryBudgetExceeded(
                    f"query budget of {self.max_queries} reached; rerun to resume from the cache"
                )
            self.sent += 1
        self.limiter.wait()
        return self._call(request)

    def check_cache_current(self, request: dict, tolerance: float = 1e-4) -> None:
        """Ask `request` afresh where the cache answers it, and stop if the endpoint now
        answers otherwise: a server restarted with another defense, cap or model behind the
        same URL would else be read from the old answers."""
        cached = self.cache.get(request)
        if cached is None:
            return
        stale = (
            f"{self.base_url} now answers otherwise than when its query cache {self.cache.path} "
            f"was written (restarted with other settings or another model?), so its cached "
            f"answers are stale: use another cache (--api-cache PATH) or delete that file"
        )
        try:
            fresh = self._send(request)
        except EndpointUnreachable as exc:  # nothing to compare with: the cache answers
            logger.warning("%s; answers come from the cache %s unchecked", exc, self.cache.path)
            return
        except TargetError as exc:  # it answered this very request before
            raise TargetError(f"{stale}; now: {exc}") from exc
        if not fresh.matches(cached, tolerance):
            raise TargetError(stale)

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
            raise EndpointUnreachable(f"cannot reach {self.base_url}: {exc}") from exc
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
            top = (
                [(RAW + t, v) for t, v in (lp.top_logprobs[0] or {}).items()]
                if lp.top_logprobs
                else []
            )
            return Reply(RAW + lp.tokens[0], lp.token_logprobs[0], top)
        return Reply("t:" + (choice.text or ""), None, [])

    def _entry_key(self, entry) -> str:
        raw = getattr(entry, "bytes", None)
        if self.mode != "raw" and raw is not None:
            return bytes(raw).hex()
        # No bytes (llama.cpp): the string, which several ids can share.
        return (RAW if self.mode == "raw" else "s:") + entry.token

    def ask_many(self, requests: list[dict], desc: str) -> list[Reply]:
        """Answer requests concurrently, in order; a failure cancels the ones not started."""
        if not requests:
            return []
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(self.ask, r) for r in requests]
            bar = progress_bar(len(futures), desc, self.progress)
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

    def map(self, fn: Callable[[T], R], items: list[T], desc: str) -> list[R]:
        """`fn` over items on the query threads (for work that asks several queries each)."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            bar = progress_bar(len(items), desc, self.progress)
            out = []
            for r in pool.map(fn, items):
                out.append(r)
                bar.update()
            bar.close()
        return out


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
