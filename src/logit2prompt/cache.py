"""The user cache directory (converted models, downloaded corpora, file hashes), and files
written whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

CACHE_ENV = "LOGIT2PROMPT_CACHE"
_HASH_CHUNK = 1 << 20


def cache_dir(*parts: str) -> Path:
    """`$LOGIT2PROMPT_CACHE`, else `$XDG_CACHE_HOME/logit2prompt`, else `~/.cache/logit2prompt`."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "logit2prompt")
    path = Path(root).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, memoised on (path, size, mtime) because weight files are large."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = cache_dir() / "file_hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    memo[key] = h.hexdigest()
    try:
        with atomic_open(memo_path) as f:
            f.write(json.dumps(memo))
    except OSError:
        pass  # the memo is an optimisation; a read-only cache must not break loading
    return memo[key]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open `path` for writing through a temporary file beside it, synced and renamed over
    `path` on a clean exit and removed on any error: readers, and a killed run's rerun, see the
    old file or the new one, never a part. Text is UTF-8."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
