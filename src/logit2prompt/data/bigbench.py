"""The default corpus: English task inputs from the BIG-bench sdist on PyPI (Apache-2.0).

The `bigbench` sdist cannot be pip-installed (it declares a file:// dependency), so we fetch the
archive from the package index once (`packages.fetch`) and read `benchmark_tasks/*/task.json`.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from pathlib import Path

from tqdm.auto import tqdm

from ..cache import atomic_open, cache_dir
from ..errors import CorpusError
from .packages import Distribution, fetch

SDIST = Distribution("bigbench", "1.0.0", "bigbench-1.0.0.tar.gz")
LICENCE = "Apache-2.0"
MIN_WORDS, MAX_WORDS = 5, 60
MAX_PER_TASK = 2000
MIN_ASCII_FRACTION = 0.98  # a cheap English filter: drops translation and non-Latin tasks
CORPUS_NAME = "bigbench_prompts.jsonl"
_TASK_RE = re.compile(r"bigbench/benchmark_tasks/(.+)/task\.json$")


def download_sdist() -> Path:
    """The cached sdist, downloaded (with sha256 check) on first use."""
    return fetch(SDIST)


def _inputs(task: dict) -> list[str]:
    out = []
    for ex in task.get("examples", []):
        text = ex.get("input") if isinstance(ex, dict) else None
        if isinstance(text, str):
            out.append(" ".join(text.split()))
    return out


def _keep(text: str) -> bool:
    words = len(text.split())
    if not MIN_WORDS <= words <= MAX_WORDS:
        return False
    return sum(c.isascii() for c in text) >= MIN_ASCII_FRACTION * len(text)


def build_bigbench_corpus(out: str | Path | None = None, force: bool = False) -> Path:
    """Extract the default corpus (`{"prompt", "task"}` JSONL); cached after the first build."""
    out = Path(out) if out else cache_dir("corpora") / CORPUS_NAME
    if out.is_file() and not force:
        return out
    archive = download_sdist()
    per_task: dict[str, list[str]] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tqdm(tar, desc="read BIG-bench tasks", unit="file"):
            match = _TASK_RE.search(member.name)
            if not match or not member.isfile():
                continue
            try:
                task = json.load(tar.extractfile(member))
            except (ValueError, UnicodeDecodeError):
                continue  # a handful of task files are not plain JSON; skip them
            name = match.group(1).split("/")[0]
            per_task.setdefault(name, []).extend(t for t in _inputs(task) if _keep(t))
    seen: set[str] = set()
    rows = []
    for name in sorted(per_task):
        unique = [t for t in dict.fromkeys(per_task[name]) if t not in seen]
        # Cap big tasks deterministically (by text hash), so no single task dominates.
        unique.sort(key=lambda t: hashlib.sha256(t.encode()).hexdigest())
        for text in unique[:MAX_PER_TASK]:
            seen.add(text)
            rows.append({"prompt": text, "task": name})
    if not rows:
        raise CorpusError(f"no prompts extracted from {archive}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out
