"""The README's main command, end to end at toy size: a synthetic corpus, the tiny target, the
default recipe (prefix-lm reading 2 neighbours, then the target's re-ranking)."""

from __future__ import annotations

import json
import logging

import pytest

from logit2prompt.data.store import DistributionStore
from logit2prompt.errors import CheckpointError
from logit2prompt.recipes.quickstart import QuickstartConfig, format_report, run_quickstart


@pytest.fixture
def synthetic_corpus(tmp_path):
    # Enough rows that the hash split leaves a handful of test and validation prompts.
    path = tmp_path / "prompts.jsonl"
    with open(path, "w") as f:
        for i in range(500):
            f.write(json.dumps({"prompt": f"Question {i}: what is {i} plus {i % 7}?"}) + "\n")
    return path


def test_quickstart_runs_and_reuses_its_steps(synthetic_corpus, tiny_lm_dir, tmp_path, caplog):
    from logit2prompt.cli.main import main

    caplog.set_level(logging.INFO, logger="logit2prompt.recipes.quickstart")
    out = tmp_path / "qs"
    cfg = QuickstartConfig(
        out=str(out),
        scale=0.001,
        target=str(tiny_lm_dir),
        corpus=str(synthetic_corpus),
        progress=False,
    )
    assert cfg.preset == "prefix-lm" and cfg.neighbours == 2  # the defaults under test
    first = run_quickstart(cfg)
    test = DistributionStore(out / "stores" / "test")
    train = DistributionStore(out / "stores" / "train")
    assert len(test) > 0 and len(train) == cfg.train_prompts
    methods = set(first["results"])
    assert {"inverter", "nearest neighbour", "constant guess"} < methods
    assert any("re-ranked by the target" in m for m in methods)
    assert all(r["n"]["mean"] == len(test) for r in first["results"].values())
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["hidden"] for r in rows] == test.prompts
    # The re-ranked answer is one of its candidates: the inverter's output or a train prompt.
    assert all(r["reranked"] in {r["recovered"], *train.prompts} for r in rows)
    assert all(r["fallback"] in {r["recovered"], *train.prompts} for r in rows)
    # Rows that kept the inverter's own output answer with it; only the others may differ.
    assert 0 <= first["fallback_kept_own"] <= len(rows)
    changed = sum(r["fallback"] != r["recovered"] for r in rows)
    assert changed <= len(rows) - first["fallback_kept_own"]
    assert any("no target queries" in m for m in methods)
    trained = json.loads((out / "inverter" / "training_args.json").read_text())
    assert trained["preset"] == "prefix-lm" and trained["neighbours"] == 2
    assert not (out / "inverter" / "checkpoints").exists()  # resume state pruned once done
    weights = out / "inverter" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    printed = format_report(first)
    assert f"Test split: {len(test)} hidden prompts" in printed
    assert "examples across the BLEU range" in printed and first["examples"][0]["hidden"] in printed
    assert all(m in printed for m in methods)  # the table has a row per method
    caplog.clear()

    second = run_quickstart(cfg)  # every step reused: no retraining, same answers
    assert "reusing the trained inverter" in caplog.text
    assert weights.stat().st_mtime_ns == mtime
    assert second["results"] == first["results"]

    other = QuickstartConfig(**{**cfg.__dict__, "preset": "tiny"})
    with pytest.raises(CheckpointError, match="prefix-lm.*remove that folder"):
        run_quickstart(other)

    t5 = run_quickstart(QuickstartConfig(**{**other.__dict__, "out": str(tmp_path / "t5")}))
    t5_args = json.loads((tmp_path / "t5" / "inverter" / "training_args.json").read_text())
    assert t5_args["preset"] == "tiny" and t5_args["per_device_batch_size"] == 32
    assert t5["results"]["nearest neighbour"] == first["results"]["nearest neighbour"]

    # The README's next step after the quickstart.
    assert main(["invert", "--checkpoint", str(out / "inverter"), "--text", "Question 3"]) == 0


def test_the_default_corpus_falls_back_to_the_mix(monkeypatch, synthetic_corpus, caplog):
    """Where the package index no longer serves the BIG-bench release, the quickstart trains on
    the default mix (less what the index does not serve) and says so."""
    from logit2prompt.errors import PackageUnavailable
    from logit2prompt.recipes import quickstart

    def gone():
        raise PackageUnavailable("bigbench-1.0.0.tar.gz is not listed on the index")

    asked = {}
    monkeypatch.setattr(quickstart, "build_bigbench_corpus", gone)
    monkeypatch.setattr(quickstart, "build_mix", lambda **kw: asked.update(kw) or synthetic_corpus)
    assert quickstart.default_corpus() == str(synthetic_corpus)
    assert asked == {"skip_unavailable": True}
    assert "trains on the default mix instead" in caplog.text
    monkeypatch.setattr(quickstart, "build_bigbench_corpus", lambda: "bigbench.jsonl")
    assert quickstart.default_corpus() == "bigbench.jsonl"
