"""Distribution files fetched from the Python package index, sha256-checked and cached.

The corpora are built from data that ships inside packages (the index is the one registry every
machine of ours reaches). Files are fetched directly rather than pip-installed: some of them
cannot be installed (`bigbench` declares a file:// dependency) and none of their code is run.
Point `LOGIT2PROMPT_PYPI_SIMPLE` at a mirror's simple index to use it instead of pypi.org.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..cache import cache_dir
from ..errors import CorpusError, PackageUnavailable

INDEX_ENV = "LOGIT2PROMPT_PYPI_SIMPLE"
DEFAULT_INDEX = "https://pypi.org/simple"


@dataclass(frozen=True)
class Distribution:
    """One file of one release: `filename` as the index lists it (wheel or sdist)."""

    package: str
    version: str
    filename: str

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


def _index_url(dist: Distribution) -> tuple[str, str]:
    """The file's download URL and the sha256 the index states for it ('' if none)."""
    index = os.environ.get(INDEX_ENV, DEFAULT_INDEX).rstrip("/")
    page_url = f"{index}/{dist.package}/"
    page = urllib.request.urlopen(page_url, timeout=60).read().decode()
    match = re.search(r'href="((?:[^"]*/)?' + re.escape(dist.filename) + r'(?:#[^"]*)?)"', page)
    if not match:
        # Indexes drop releases (a yanked or withdrawn file): say what is there and how to
        # supply the file, rather than just that it is missing.
        listed = sorted(set(re.findall(r'href="(?:[^"]*/)?([^"/#]+)(?:#[^"]*)?"', page)))
        raise PackageUnavailable(
            f"{dist.filename} is not listed on {index}/{dist.package}/ (it lists: "
            f"{', '.join(listed) or 'nothing'}); put a copy of the file at "
            f"{cache_dir('downloads') / dist.filename} or set {INDEX_ENV} to an index that "
            "serves it"
        )
    url, _, digest = html.unescape(match.group(1)).partition("#sha256=")
    return urllib.parse.urljoin(page_url, url), digest


def fetch(dist: Distribution) -> Path:
    """The cached file of `dist`, downloaded with a progress bar and checked on first use."""
    dest = cache_dir("downloads") / dist.filename
    if dest.is_file():
        return dest
    tmp = dest.with_suffix(f".part{os.getpid()}")
    try:
        url, expected = _index_url(dist)
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=120) as resp, open(tmp, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0)
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dist.spec}") as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CorpusError(
            f"could not download {dist.filename} from the package index: {exc} "
            f"(set {INDEX_ENV} to use a mirror)"
        ) from exc
    if expected and digest.hexdigest() != expected:
        tmp.unlink(missing_ok=True)
        raise CorpusError(
            f"{dist.filename} checksum mismatch: got {digest.hexdigest()}, index says {expected}"
        )
    os.replace(tmp, dest)
    return dest
