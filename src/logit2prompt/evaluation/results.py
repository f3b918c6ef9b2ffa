"""Benchmark result files: indented JSON, written atomically, with the machine that measured it.

Committed results must not leak the paths of the machine that produced them, and must say what
hardware the numbers come from: `write_results` measures the machine at run time and rewrites
every absolute path inside the results (and the recorded command) to a relative one.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path, PurePosixPath
from typing import Any

from ..cache import atomic_open

logger = logging.getLogger(__name__)

CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # what decides whether bf16 autocast pays on a CPU


def _cpuinfo() -> tuple[str | None, set[str]]:
    """The CPU model name and flags from /proc/cpuinfo (None and empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None, set()
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def machine_info() -> dict:
    """The machine running this process, measured now: CPU, cores, torch and any CUDA device."""
    import torch

    model, flags = _cpuinfo()
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        **{flag: flag in flags for flag in CPU_FLAGS},
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_device": cuda,
    }


def relative_path(path: str, cwd: Path | None = None) -> str:
    """An absolute path relative to `cwd` when under it, else its final component."""
    p = PurePosixPath(path)
    cwd = cwd or Path.cwd()
    # The resolved cwd too: /tmp and home directories are often reached through symlinks.
    for base in dict.fromkeys((PurePosixPath(cwd), PurePosixPath(cwd.resolve()))):
        if p == base:
            return "."
        if p.is_relative_to(base):
            return str(p.relative_to(base))
    return p.name or path


def _is_path(s: str) -> bool:
    """An absolute path, not text that starts with "/" (a prompt like "/imagine a cat" or
    "/help", a fraction "/2"): no whitespace, and two separators or a file that exists."""
    return (
        s.startswith("/")
        and not any(c.isspace() for c in s)
        and (s.count("/") >= 2 or os.path.exists(s))
    )


def _relativize_str(s: str, cwd: Path) -> str:
    if _is_path(s):
        return relative_path(s, cwd)
    # A command-line option written as --flag=/abs/path.
    key, eq, value = s.partition("=")
    if eq and key.startswith("-") and _is_path(value):
        return f"{key}={relative_path(value, cwd)}"
    return s


def relativize(obj: Any, cwd: Path | None = None) -> Any:
    """`obj` with every absolute path string (in dicts, lists, tuples, at any depth) relative."""
    cwd = cwd or Path.cwd()
    if isinstance(obj, str):
        return _relativize_str(obj, cwd)
    if isinstance(obj, os.PathLike):
        return _relativize_str(os.fspath(obj), cwd)
    if isinstance(obj, dict):
        return {
            (_relativize_str(k, cwd) if isinstance(k, str) else k): relativize(v, cwd)
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [relativize(v, cwd) for v in obj]
    return obj


def write_results(path: str | Path, results: dict, *, command: list[str] | None = None) -> dict:
    """Write `results` as indented JSON to `path`, atomically; returns what was written.

    The written object is `command` (when given), then `results`, then a `machine` block measured
    now (replacing any `machine` in `results`). Absolute paths are made relative everywhere.
    """
    path = Path(path)
    out: dict = {}
    if command is not None:
        out["command"] = list(command)
    out.update(results)
    out["machine"] = machine_info()
    out = relativize(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(out, indent=1, ensure_ascii=False) + "\n"
    with atomic_open(path) as f:
        f.write(text)
    logger.info("wrote %s", path)
    return out
