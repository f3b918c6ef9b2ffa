"""Prompt corpora: read from files or the hub, normalise, deduplicate, filter, split."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..cache import atomic_open
from ..errors import CorpusError

DEFAULT_FIELD = "prompt"
DEFAULT_MAX_TOKENS = 64  # the paper inverts prompts of at most 64 tokens
SPLITS = ("train", "validation", "test")
# Benchmark split rule (shared with ../shared/data/README.md): sha256(normalised text) mod 100.
TEST_BUCKETS = 2
VALIDATION_BUCKET = 2
HUB_PREFIX = "hf:"
LENGTH_CHUNK = 4096  # prompts tokenised at a time while filtering by length
SUFFIXES = (".jsonl", ".json", ".csv", ".txt", ".parquet")


def normalise(text: str) -> str:
    """Collapse all runs of whitespace to one space and strip the ends."""
    return " ".join(text.split())


def words_of(text: str) -> list[str]:
    """Lower-cased runs of letters and digits: the words n-gram overlaps compare (case and
    punctuation ignored)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def word_ngrams(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    """The distinct n-grams of a word list (none when it is shorter than n)."""
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def split_of(text: str) -> str:
    """Deterministic split of a (normalised) prompt: 2% test, 1% validation, 97% train."""
    bucket = int(hashlib.sha256(normalise(text).encode("utf-8")).hexdigest(), 16) % 100
    if bucket < TEST_BUCKETS:
        return "test"
    return "validation" if bucket == VALIDATION_BUCKET else "train"


@dataclass
class PromptRecord:
    """One prompt and whatever other fields its corpus row had (task, source, ...)."""

    text: str
    meta: dict = field(default_factory=dict)
    tokens: int | None = None  # target tokens, once a length filter has counted them

    @property
    def split(self) -> str:
        return split_of(self.text)


@dataclass
class Corpus:
    """Prompts after cleaning, with counts of everything that was dropped and why."""

    records: list[PromptRecord]
    source: str
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.records]

    def split(self, name: str | None) -> Corpus:
        """The records of one split (or all when name is None or 'all')."""
        if name in (None, "all"):
            return self
        if name not in SPLITS:
            raise CorpusError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)} or all")
        keep = [r for r in self.records if r.split == name]
        return Corpus(keep, self.source, dict(self.dropped))

    def split_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(SPLITS, 0)
        for r in self.records:
            counts[r.split] += 1
        return counts

    def sha256(self) -> str:
        """Identity of the exact prompt list, in order."""
        return hashlib.sha256(json.dumps(self.texts).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- reading
def _rows_from_json(obj, path: Path) -> list:
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise CorpusError(f"{path}: a JSON object must hold exactly one list of prompts")
        obj = lists[0]
    if not isinstance(obj, list):
        raise CorpusError(f"{path}: expected a JSON list of prompts or objects")
    return obj


def _read_text(path: Path) -> str:
    try:  # utf-8-sig: a leading byte-order mark is not part of the first prompt
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path} is not valid UTF-8 (byte {exc.start}: "
            f"{exc.object[exc.start : exc.start + 4]!r}); re-encode it as UTF-8"
        ) from exc


def text_lines(text: str) -> list[str]:
    """Lines split at \\n alone (\\r\\n too): `str.splitlines` also splits at U+2028, U+0085
    and form feeds, which JSON Lines written with ensure_ascii=False hold raw inside strings."""
    lines = text.split("\n")
    if lines and not lines[-1]:
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def whole_lines(path: Path) -> list[str]:
    """The complete lines of an append-only file (none if it does not exist); a last line a
    killed run cut short is dropped from the file, so appending continues cleanly."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    whole = text[: text.rfind("\n") + 1]
    if whole != text:  # rewritten whole: a kill now cannot cost the complete lines too
        with atomic_open(path) as f:
            f.write(whole)
    return text_lines(whole)


def read_rows(source: str, field_name: str = DEFAULT_FIELD) -> list[dict]:
    """Raw rows of a corpus file or `hf:NAME[:CONFIG[:SPLIT]]` dataset, each with `field_name`."""
    if source.startswith(HUB_PREFIX):
        return _read_hub(source[len(HUB_PREFIX) :], field_name)
    path = Path(source)
    if not path.exists():
        raise CorpusError(f"corpus file {path} does not exist")
    if not path.is_file():
        raise CorpusError(f"corpus path {path} is not a file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for lineno, line in enumerate(text_lines(_read_text(path)), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise CorpusError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from exc
        elif suffix == ".json":
            try:
                rows = _rows_from_json(json.loads(_read_text(path)), path)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}: invalid JSON: {exc}") from exc
        elif suffix == ".txt":
            rows = [{field_name: line} for line in text_lines(_read_text(path))]
        elif suffix == ".csv":
            rows = list(csv.DictReader(io.StringIO(_read_text(path), newline="")))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                rows = pq.read_table(path).to_pylist()
            except Exception as exc:  # pyarrow raises several unrelated types
                raise CorpusError(f"{path}: unreadable parquet file: {exc}") from exc
        else:
            raise CorpusError(f"{path}: unknown corpus format; use one of {', '.join(SUFFIXES)}")
    except PermissionError as exc:
        raise CorpusError(f"cannot read {path}: permission denied") from exc
    rows = [r if isinstance(r, dict) else {field_name: r} for r in rows]
    if rows and not any(field_name in r for r in rows):
        available = sorted({k for r in rows[:100] for k in r})
        raise CorpusError(
            f"{path}: no row has the text field {field_name!r}; "
            f"fields found: {', '.join(available)} (choose one with --field)"
        )
    return rows


def _read_hub(spec: str, field_name: str) -> list[dict]:
    name, _, rest = spec.partition(":")
    config, _, split = rest.partition(":")
    try:
        import datasets
    except ImportError as exc:
        raise CorpusError("hub corpora need the `datasets` package: pip install datasets") from exc
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # network, missing dataset, ...: report whatever the hub said
        raise CorpusError(f"could not load hub dataset {name!r}: {exc}") from exc
    if field_name not in ds.column_names:
        raise CorpusError(
            f"hub dataset {name!r} has no column {field_name!r}; "
            f"columns: {', '.join(ds.column_names)}"
        )
    return list(ds)


# --------------------------------------------------------------------------- cleaning
def clean(
    rows: Iterable[dict],
    source: str,
    *,
    field_name: str = DEFAULT_FIELD,
    count_tokens: Callable[[Sequence[str]], list[int]] | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
) -> Corpus:
    """Normalise whitespace, drop empty/duplicate/over-long prompts, and count each drop."""
    dropped = {"missing_field": 0, "not_text": 0, "empty": 0, "duplicate": 0, "too_long": 0}
    seen: set[str] = set()
    records = []
    for row in rows:
        value = row.get(field_name)
        if value is None:
            dropped["missing_field"] += 1
            continue
        if not isinstance(value, str):  # a chat message list, a number: not a prompt's text
            dropped["not_text"] += 1
            continue
        text = normalise(value)
        if not text:
            dropped["empty"] += 1
            continue
        if text in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(text)
        meta = {k: v for k, v in row.items() if k != field_name and _is_scalar(v)}
        records.append(PromptRecord(text, meta))
    corpus = Corpus(records, source, dropped)
    return filter_length(corpus, count_tokens, max_tokens)


def filter_length(
    corpus: Corpus,
    count_tokens: Callable[[Sequence[str]], list[int]] | None,
    max_tokens: int | None,
    limit: int | None = None,
) -> Corpus:
    """Drop prompts over `max_tokens` tokens (counted in `dropped['too_long']`) and keep at
    most `limit`; with a limit, only as many prompts are tokenised as needed to reach it."""
    if count_tokens is None or max_tokens is None or not corpus.records:
        return Corpus(corpus.records[:limit], corpus.source, dict(corpus.dropped))
    kept: list[PromptRecord] = []
    too_long = 0
    chunk = max(4 * (limit or 0), LENGTH_CHUNK)
    for start in range(0, len(corpus.records), chunk):
        part = corpus.records[start : start + chunk]
        for record, n in zip(part, count_tokens([r.text for r in part]), strict=True):
            if n <= max_tokens:
                kept.append(replace(record, tokens=n))
            else:
                too_long += 1
        if limit is not None and len(kept) >= limit:
            break
    return Corpus(kept[:limit], corpus.source, {**corpus.dropped, "too_long": too_long})


def _is_scalar(v) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


def load_corpus(
    source: str,
    *,
    field_name: str = DEFAULT_FIELD,
    count_tokens: Callable[[Sequence[str]], list[int]] | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    split: str | None = None,
    limit: int | None = None,
) -> Corpus:
    """Read, clean, split and cut a corpus; raises CorpusError if nothing is left."""
    rows = read_rows(source, field_name)
    # Split before counting tokens: tokenising only the chosen split is much faster.
    corpus = clean(rows, source, field_name=field_name).split(split)
    corpus = filter_length(corpus, count_tokens, max_tokens, limit)
    if not corpus.records:
        details = ", ".join(f"{k}={v}" for k, v in corpus.dropped.items() if v)
        raise CorpusError(
            f"no prompts left in {source} after filtering"
            + (f" to split {split!r}" if split not in (None, "all") else "")
            + (f" (dropped: {details})" if details else f" ({len(rows)} rows read)")
        )
    return corpus


BUILTIN_CORPORA = ("bigbench", "mix")


def resolve_corpus(name: str) -> str:
    """A built-in corpus name ('bigbench', 'mix') becomes its cached file (built on first use,
    the mix with its default sources, less any the package index no longer serves); paths
    pass through."""
    if name == "bigbench":
        from .bigbench import build_bigbench_corpus

        return str(build_bigbench_corpus())
    if name == "mix":
        from .mix import build_mix

        return str(build_mix(skip_unavailable=True))
    return name
