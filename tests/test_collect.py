"""Collection as users run it: the CLI, a SIGKILL mid-run, and `accelerate launch`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from logit2prompt.data.store import DistributionStore

from .conftest import accelerate_launch


def _corpus(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "prompts.txt"
    words = ["red", "blue", "green", "cat", "dog", "sea", "sun", "tree", "book", "song"]
    lines = [f"the {words[i % 10]} {words[(i // 10) % 10]} number {i}" for i in range(n)]
    path.write_text("\n".join(lines))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "logit2prompt.cli.main", *args]


def _collect_args(tiny_lm_dir, corpus, out, shard_size=4) -> list[str]:
    return [
        "collect",
        "--target",
        str(tiny_lm_dir),
        "--mode",
        "raw",
        "--prompts",
        str(corpus),
        "--out",
        str(out),
        "--shard-size",
        str(shard_size),
        "--batch-size",
        "4",
        "--no-progress",
    ]


def _store_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((path / "shards").iterdir())}


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(tiny_lm_dir, tmp_path):
    corpus = _corpus(tmp_path, 1600)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cli(*_collect_args(tiny_lm_dir, corpus, ref)), check=True, capture_output=True)
    proc = subprocess.Popen(
        _cli(*_collect_args(tiny_lm_dir, corpus, killed)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        shards = killed / "shards"
        if shards.is_dir() and len(list(shards.glob("*.json"))) >= 5:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((killed / "shards").glob("*.json")))
    assert 5 <= done < 400, "the kill must land mid-collection"
    with pytest.raises(Exception, match="incomplete"):
        DistributionStore(killed)
    rerun = subprocess.run(
        _cli(*_collect_args(tiny_lm_dir, corpus, killed)),
        check=True,
        capture_output=True,
        text=True,
    )
    assert "resumed" in rerun.stdout
    assert _store_files(killed) == _store_files(ref)  # byte for byte, no shard lost or doubled
    assert DistributionStore(killed).prompts == DistributionStore(ref).prompts


@pytest.mark.slow
def test_accelerate_two_processes_make_one_store(tiny_lm_dir, tmp_path):
    corpus = _corpus(tmp_path, 40)
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli(*_collect_args(tiny_lm_dir, corpus, one)), check=True, capture_output=True)
    launch = accelerate_launch(
        "logit2prompt.cli.main",
        *_collect_args(tiny_lm_dir, corpus, two),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = DistributionStore(one), DistributionStore(two)
    assert a.prompts == b.prompts and a.meta == b.meta
    assert np.abs(a.vectors(range(len(a))) - b.vectors(range(len(b)))).max() <= 1e-3


def test_cli_errors_are_clear(tiny_lm_dir, tmp_path):
    corpus = _corpus(tmp_path, 10)
    bad = subprocess.run(
        _cli(
            "collect",
            "--target",
            str(tmp_path / "nope"),
            "--prompts",
            str(corpus),
            "--out",
            str(tmp_path / "o"),
        ),
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "error: could not load target" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run(
        _cli(*_collect_args(tiny_lm_dir, tmp_path / "none.jsonl", tmp_path / "o")),
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
