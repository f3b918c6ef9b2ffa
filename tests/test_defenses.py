"""Defense transforms: their math, composition, parsing, and how collection records them."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from logit2prompt.data.collect import collect
from logit2prompt.data.corpus import Corpus, PromptRecord
from logit2prompt.data.store import DistributionStore, read_manifest
from logit2prompt.defenses.chain import FLOOR, DefenseError, parse_defense
from logit2prompt.errors import Logit2PromptError, StoreError
from logit2prompt.targets import load_target
from logit2prompt.targets.defended import DefendedTarget

from .conftest import tiny_train_config


def _lp(rows: int = 4, vocab: int = 1000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(rows, vocab, generator=g) * 3, dim=-1)


def test_temperature_scales_logits_and_normalises():
    x = _lp()
    out = parse_defense("temperature:2").apply(x)
    assert torch.allclose(out, torch.log_softmax(x / 2, -1), atol=1e-6)
    assert torch.allclose(out.exp().sum(-1), torch.ones(4), atol=1e-5)
    assert out.max(-1).values.lt(x.max(-1).values).all()  # flatter


def test_topk_keeps_exactly_k_renormalised():
    x = _lp()
    x[0, :10] = x[0, 0]  # ties must not keep more than k
    out = parse_defense("topk:5").apply(x)
    kept = out > FLOOR
    assert kept.sum(-1).tolist() == [5, 5, 5, 5]
    assert torch.allclose(
        out.masked_fill(~kept, float("-inf")).exp().sum(-1), torch.ones(4), atol=1e-5
    )
    top = x.topk(5, -1).values
    assert torch.allclose(
        out.topk(5, -1).values, top - torch.logsumexp(top, -1, keepdim=True), atol=1e-5
    )


def test_expose_keeps_raw_topk_values():
    x = _lp()
    out = parse_defense("expose:3").apply(x)
    assert ((out > FLOOR).sum(-1) == 3).all()
    assert torch.equal(out.topk(3, -1).values, x.topk(3, -1).values)  # unchanged, not renormalised


def test_topp_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = parse_defense("topp:0.75").apply(probs.log())
    assert (out > FLOOR).tolist() == [[True, True, False, False]]
    assert torch.allclose(out[0, :2].exp(), torch.tensor([0.625, 0.375]), atol=1e-6)
    assert (parse_defense("topp:1").apply(probs.log()) > FLOOR).sum() == 4


@pytest.mark.parametrize("dist,std_factor", [("gauss", 1.0), ("laplace", math.sqrt(2))])
def test_noise_has_the_stated_scale_and_is_reproducible(dist, std_factor):
    x = _lp(rows=2, vocab=200_000)
    chain = parse_defense(f"noise:{dist}:0.5")
    out = chain.apply(x)
    # Renormalising shifts each row by a constant, so the spread of the difference is the noise.
    diff = out - x
    diff = diff - diff.mean(-1, keepdim=True)
    assert diff.std(-1).sub(0.5 * std_factor).abs().max() < 0.01
    assert torch.equal(out, chain.apply(x))  # same prompt, same noise
    assert not torch.equal(out[0], chain.apply(x[1:2])[0])


def test_noise_privacy_parameters():
    (laplace,) = parse_defense("noise:laplace:2").defenses
    assert laplace.privacy()["epsilon"] == pytest.approx(0.5)
    (gauss,) = parse_defense("noise:gauss:4").defenses
    eps = gauss.privacy(delta=1e-5)["epsilon"]
    assert eps == pytest.approx(math.sqrt(2 * math.log(1.25 / 1e-5)) / 4)
    assert parse_defense("topk:3").defenses[0].privacy() == {}


def test_rounding():
    x = torch.tensor([[-0.123456, -2.987654]])
    assert torch.allclose(parse_defense("round:2").apply(x), torch.tensor([[-0.12, -2.99]]))


def test_composition_applies_left_to_right():
    x = _lp()
    a = parse_defense("topk:5,temperature:3").apply(x)
    (topk,), (temperature,) = (
        parse_defense("topk:5").defenses,
        parse_defense("temperature:3").defenses,
    )
    manual = temperature.apply(topk.apply(x))  # hidden entries at -inf until the chain ends
    assert torch.allclose(a, manual.masked_fill(manual == float("-inf"), FLOOR), atol=1e-6)
    assert ((a > FLOOR).sum(-1) == 5).all()  # what top-k hid stays hidden
    # The order matters: nucleus of the flattened distribution keeps more tokens.
    flat_first = parse_defense("temperature:3,topp:0.5").apply(x)
    nucleus_first = parse_defense("topp:0.5,temperature:3").apply(x)
    assert ((flat_first > FLOOR).sum(-1) > (nucleus_first > FLOOR).sum(-1)).all()
    assert parse_defense("topk:5, temperature:3").spec == "topk:5,temperature:3"
    assert not parse_defense(None) and not parse_defense("none")


def test_hidden_entries_stay_hidden_through_the_chain():
    """A temperature or noise after topk/topp/expose must not lift the hidden entries (shown at
    FLOOR) back into the distribution: /10 made -100 into -10, ~95 tokens back in play."""
    x = torch.log_softmax(3 * torch.randn(4, 100), -1)
    for spec in ("topk:5,temperature:10", "topk:5,noise:laplace:10", "expose:5,round:0"):
        out = parse_defense(spec).apply(x)
        hidden = out == FLOOR
        assert hidden.sum(-1).tolist() == [95] * 4, spec
        if not spec.startswith("expose"):  # the served part is a distribution over the five
            kept = out.masked_fill(hidden, float("-inf")).logsumexp(-1)
            assert torch.allclose(kept, torch.zeros(4), atol=1e-5), spec


@pytest.mark.parametrize(
    "spec,message",
    [
        ("topk", "takes 1 parameter"),
        ("topk:x", "bad number"),
        ("topk:0", "k >= 1"),
        ("noise:uniform:1", "gauss or laplace"),
        ("noise:gauss:-1", "positive"),
        ("topp:1.5", "0 < p <= 1"),
        ("blur:3", "unknown defense"),
        ("topk:5,,round:1", "empty item"),
        ("temperature:0", "positive"),
        ("temperature:inf", "finite"),
        ("noise:gauss:inf", "finite"),
        ("round:20", "0..8"),
    ],
)
def test_malformed_specs_are_refused(spec, message):
    with pytest.raises(DefenseError, match=message):
        parse_defense(spec)


def test_defended_collection_is_recorded_and_never_mixed(tiny_lm_dir, tmp_path):
    target = load_target(str(tiny_lm_dir), mode="raw")
    defended = DefendedTarget(target, parse_defense("topk:10,noise:gauss:0.5"))
    corpus = Corpus([PromptRecord(f"prompt {i}") for i in range(6)], "memory")
    collect(defended, corpus, tmp_path / "d", shard_size=4, progress=False)
    manifest = read_manifest(tmp_path / "d")
    assert manifest["fingerprint"]["defense"] == "topk:10,noise:gauss:0.5"
    store = DistributionStore(tmp_path / "d")
    clean = target.next_token_logprobs(corpus.texts)
    assert not torch.allclose(torch.from_numpy(store.vectors(range(6))[:, 0]), clean, atol=0.1)
    with pytest.raises(StoreError, match="defense"):
        collect(target, corpus, tmp_path / "d", shard_size=4, progress=False)
    # Rerunning the defended collection resumes (same fingerprint, deterministic noise).
    again = collect(defended, corpus, tmp_path / "d", shard_size=4, progress=False)
    assert again.shards_skipped == 2


def test_collect_cli_defense_flag(tiny_lm_dir, tmp_path, capsys):
    from logit2prompt.cli.main import main

    corpus = tmp_path / "p.txt"
    corpus.write_text("one prompt\nanother prompt\n")
    base = [
        "collect",
        "--target",
        str(tiny_lm_dir),
        "--mode",
        "raw",
        "--prompts",
        str(corpus),
        "--no-progress",
    ]
    assert main([*base, "--out", str(tmp_path / "bad"), "--defense", "topk:"]) == 2
    assert "bad number in 'topk:'" in capsys.readouterr().err
    # API flags on a local model did nothing: refused.
    assert main([*base, "--out", str(tmp_path / "bad"), "--api-top-k", "5"]) == 2
    assert "--api-top-k: for API targets" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "ok"), "--defense", "expose:5"]) == 0
    assert read_manifest(tmp_path / "ok")["fingerprint"]["defense"] == "expose:5"


def test_defend_sweep_end_to_end(tiny_lm_dir, tmp_path):
    """Tiny inverter, two defenses: results, plot and a parseable HTML report with both rows."""
    from html.parser import HTMLParser

    from logit2prompt.defenses.sweep import SweepConfig, run_sweep, utility_cost
    from logit2prompt.training.trainer import Trainer

    from .conftest import FIXTURE_PROMPTS

    target = load_target(str(tiny_lm_dir), mode="raw")
    corpus = Corpus([PromptRecord(p) for p in FIXTURE_PROMPTS[:8]], "fixture")
    collect(target, corpus, tmp_path / "s", shard_size=8, store_dtype="float32", progress=False)
    Trainer(
        tiny_train_config(
            tmp_path / "s", tmp_path / "inv", tiny_lm_dir, max_steps=40, schedule="cosine"
        )
    ).run()
    config = SweepConfig(
        checkpoint=str(tmp_path / "inv"),
        train_data=str(tmp_path / "s"),
        test_data=str(tmp_path / "s"),
        out=str(tmp_path / "sweep"),
        specs=("temperature:3", "expose:3", "topk:3,expose:2"),
        finetune_steps=3,
        batch_size=8,
        reply_prompts=4,
        mixed_precision="no",
    )
    results = run_sweep(config, progress=False)
    specs = [r["spec"] for r in results["rows"]]
    assert specs == ["none", "temperature:3", "expose:3", "topk:3,expose:2"]
    temp, expose, mixed = results["rows"][1:]
    # A mixed chain costs what its sampled part (topk:3) costs; expose only changes the display.
    store = DistributionStore(tmp_path / "s")
    clean = torch.from_numpy(store.vectors(range(len(store))))[:, 0]
    sampled = utility_cost(clean, parse_defense("topk:3").apply(clean), False)
    assert mixed["utility"]["kl"] == pytest.approx(sampled["kl"], rel=1e-4) and sampled["kl"] > 0
    assert temp["utility"]["kl"] > 0 and temp["utility"]["tv"] > 0
    # Flattening every step's distribution changes what the service samples.
    assert temp["utility"]["reply_changed"] > 0 and temp["utility"]["reply_bleu"] < 100
    assert expose["utility"] == {
        "kl": 0.0,
        "tv": 0.0,
        "top1_changed": 0.0,
        "reply_bleu": 100.0,
        "reply_changed": 0.0,
    }
    assert 0.0 <= temp["adaptive"]["cosine"] <= 1.0
    assert (tmp_path / "sweep" / "leakage_vs_utility.png").read_bytes()[:4] == b"\x89PNG"
    tuned_fp = json.loads(
        (tmp_path / "sweep" / "adaptive" / "temperature_3" / "fingerprint.json").read_text()
    )
    assert tuned_fp["defense"] == "temperature:3"  # the adaptive inverter says what it reads

    class Collect(HTMLParser):
        cells, images = [], []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.images.append(dict(attrs)["src"])

        def handle_data(self, data):
            self.cells.append(data)

    parser = Collect()
    parser.feed((tmp_path / "sweep" / "report.html").read_text())
    assert parser.images and parser.images[0].startswith("data:image/png;base64,")
    assert "temperature:3" in parser.cells and "expose:3" in parser.cells
    # KL of identical distributions is zero; of a flattened one, positive.
    x = torch.log_softmax(torch.randn(3, 50), -1)
    assert utility_cost(x, x, False)["kl"] == pytest.approx(0.0, abs=1e-6)

    # Killed during the second spec's fine-tune: the rerun keeps the first spec's row and
    # fine-tunes only the specs left.
    from logit2prompt.defenses import sweep

    class Killed(Exception):
        pass

    tuned: list[str] = []

    def trainer(cfg):
        tuned.append(cfg.defense)
        if len(tuned) == 2 and not resumed:
            raise Killed
        return Trainer(cfg)

    killed = replace(config, out=str(tmp_path / "killed"))
    resumed = False
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sweep, "Trainer", trainer)
        with pytest.raises(Killed):
            run_sweep(killed, progress=False)
        partial = json.loads((tmp_path / "killed" / "results.json").read_text())
        assert partial["complete"] is False
        assert [r["spec"] for r in partial["rows"]] == ["none", "temperature:3"]
        resumed, tuned[:] = True, []
        again = run_sweep(killed, progress=False)
    assert tuned == ["expose:3", "topk:3,expose:2"] and again["complete"]
    assert again["rows"][1] == partial["rows"][1]
    # A finished sweep run again is run whole (its rows may come from older code).
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sweep, "Trainer", trainer)
        tuned[:] = []
        run_sweep(killed, progress=False)
    assert len(tuned) == 3
    # Stores already defended, or from another target, are refused before any work.
    collect(
        DefendedTarget(target, parse_defense("topk:5")),
        corpus,
        tmp_path / "defended",
        shard_size=8,
        progress=False,
    )
    with pytest.raises(Logit2PromptError, match="collected under the defense 'topk:5'"):
        run_sweep(replace(config, test_data=str(tmp_path / "defended")), progress=False)
    with pytest.raises(Logit2PromptError, match="'none' is not a defense"):
        run_sweep(replace(config, specs=("topk:5", "none")), progress=False)


def test_defended_generation_samples_the_defended_distribution(tiny_lm_dir):
    """With top-1 truncation, sampling must equal greedy decoding; without it, it need not."""
    from logit2prompt.defenses.chain import DefenseLogitsProcessor

    target = load_target(str(tiny_lm_dir), mode="raw")
    from .conftest import FIXTURE_PROMPTS

    texts = FIXTURE_PROMPTS[:4]
    greedy = target.complete(texts, 8)
    top1 = target.complete(
        texts, 8, sample=True, logits_processor=[DefenseLogitsProcessor(parse_defense("topk:1"))]
    )
    assert top1 == greedy
    again = target.complete(texts, 8, sample=True, seed=0)
    assert again == target.complete(texts, 8, sample=True, seed=0)  # seeded: reproducible


def test_laplace_noise_is_always_finite():
    """Regression: a uniform draw of exactly 0 gave -inf Laplace noise (found by the sweep)."""
    from logit2prompt.defenses.chain import laplace_from_uniform

    edge = laplace_from_uniform(torch.tensor([0.0, 1e-30, 0.5, 0.9999999]), 3.0)
    assert torch.isfinite(edge).all() and edge[2] == 0
