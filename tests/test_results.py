"""Benchmark result files: relative paths only, a measured machine block, atomic writes."""

from __future__ import annotations

import json
import os

import torch

from logit2prompt.evaluation.results import relative_path, write_results


def test_absolute_paths_become_relative_at_any_depth(tmp_path, monkeypatch):
    work = tmp_path / "repo"
    work.mkdir()
    monkeypatch.chdir(work)
    elsewhere = "/somewhere/else/model.gguf"
    results = {
        "data": str(work / "runs" / "quality" / "train"),
        "rows": [
            {"checkpoint": str(work / "runs" / "ckpt"), "nested": [(elsewhere, 3)]},
            {"score": 0.5, "name": "not/a/path", "note": "/"},
            # Text that starts with "/" (prompts and predictions) is not a path.
            {"hidden": "/imagine prompt: a cat", "recovered": "/help", "x": "--ratio=/2"},
        ],
        str(work / "as-key"): work / "runs" / "a-pathlib-path",
    }
    command = ["python", str(work / "benchmarks" / "x.py"), "--out=" + str(work / "o.json")]
    out = write_results(work / "results" / "r.json", results, command=command)
    written = json.loads((work / "results" / "r.json").read_text())
    assert written == out
    assert written["command"] == ["python", "benchmarks/x.py", "--out=o.json"]
    assert written["data"] == "runs/quality/train"
    assert written["rows"][0] == {"checkpoint": "runs/ckpt", "nested": [["model.gguf", 3]]}
    assert written["rows"][1] == {"score": 0.5, "name": "not/a/path", "note": "/"}
    assert written["rows"][2] == results["rows"][2]
    assert written["as-key"] == "runs/a-pathlib-path"
    # No absolute path of this machine survives anywhere in the file.
    assert str(tmp_path) not in (work / "results" / "r.json").read_text()
    assert os.listdir(work / "results") == ["r.json"]  # no temporary file left behind


def test_relative_path_outside_cwd_keeps_only_the_name(tmp_path):
    assert relative_path("/data/models/smol.gguf", tmp_path) == "smol.gguf"
    assert relative_path(str(tmp_path / "a" / "b"), tmp_path) == "a/b"
    assert relative_path(str(tmp_path), tmp_path) == "."


def test_machine_block_is_measured(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = write_results("r.json", {"machine": "hand-written", "x": 1})
    machine = out["machine"]
    assert machine != "hand-written"  # the measured block replaces a hand-written one
    assert machine["cpu_count"] == os.cpu_count()
    assert machine["torch"] == torch.__version__
    assert machine["torch_threads"] == torch.get_num_threads()
    assert isinstance(machine["avx512_bf16"], bool) and isinstance(machine["amx_bf16"], bool)
    assert machine["cpu"]
    assert (machine["cuda_device"] is None) == (not torch.cuda.is_available())
    assert "command" not in out and out["x"] == 1


def test_written_file_has_the_mode_open_would_give(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = os.umask(0o022)
    try:
        write_results("r.json", {"x": 1})
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(before)
    mode = (tmp_path / "r.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
