"""The method registry: one definition per method, shared work done once, needs checked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from logit2prompt.data.collect import collect
from logit2prompt.data.corpus import Corpus, PromptRecord
from logit2prompt.errors import Logit2PromptError
from logit2prompt.recipes import methods
from logit2prompt.recipes.methods import NEEDS, Method, MethodContext, run_methods
from logit2prompt.targets import load_target
from logit2prompt.training.trainer import Trainer

from .conftest import FIXTURE_PROMPTS, tiny_train_config

TRAIN, TEST = FIXTURE_PROMPTS[:12], FIXTURE_PROMPTS[12:]


@pytest.fixture(scope="module")
def user_target(tiny_lm_dir):
    return load_target(str(tiny_lm_dir), mode="user")


@pytest.fixture(scope="module")
def checkpoint(user_target, tiny_lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    corpus = Corpus([PromptRecord(p) for p in TRAIN], "fixture")
    collect(user_target, corpus, str(root / "train"), shard_size=8, progress=False)
    Trainer(tiny_train_config(root / "train", root / "inv", tiny_lm_dir, max_steps=10)).run()
    return root


@pytest.fixture
def echo():
    """A method registered for one test: it answers with the hidden prompts themselves."""
    method = methods.register(
        Method(
            "echo",
            ("echo (test)",),
            lambda ctx: {"echo (test)": list(ctx.references)},
            frozenset({"references"}),
        )
    )
    yield method
    methods.unregister(method.key)


def test_a_registered_method_shows_in_evaluate(checkpoint, tmp_path, echo):
    from logit2prompt.evaluation.evaluate import EvalConfig, baseline_keys, evaluate

    assert "echo" in baseline_keys()
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(TEST) + "\n")
    results = evaluate(
        EvalConfig(
            checkpoint=str(checkpoint / "inv"),
            prompts=str(prompts),
            out=str(tmp_path / "o"),
            baselines=("echo", "nn"),
            train_data=str(checkpoint / "train"),
            fallback=True,
            semantic=False,
            functional=False,
            progress=False,
        )
    )
    summary = results["summary"]
    # Registration order is report order; the fallback row is evaluate's too now.
    assert list(summary) == [methods.INVERTER, methods.FALLBACK, methods.NEAREST, "echo (test)"]
    assert summary["echo (test)"]["exact"]["mean"] == 100.0
    rows = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["predictions"]["echo (test)"] == r["hidden"] for r in rows)
    own = [r["predictions"][methods.INVERTER] for r in rows]
    assert all(
        r["predictions"][methods.FALLBACK] in {o, *TRAIN} for r, o in zip(rows, own, strict=True)
    )
    with pytest.raises(ValueError, match="registered already"):
        methods.register(echo)


@pytest.mark.parametrize("key", [k for k in methods.method_keys() if methods.get_method(k).needs])
def test_every_method_names_what_it_lacks(key):
    ctx = MethodContext(None, np.zeros((2, 1, 4), np.float32))
    needs = methods.get_method(key).needs
    with pytest.raises(Logit2PromptError) as err:
        run_methods([key], ctx)
    for need in needs:
        assert f"method(s) ['{key}'] need {NEEDS[need]}" in str(err.value)


def test_missing_needs_are_refused_before_any_work(checkpoint, tmp_path):
    from logit2prompt.evaluation.evaluate import EvalConfig, evaluate

    ctx = MethodContext(object(), np.zeros((2, 1, 4), np.float32), target=object())
    with pytest.raises(Logit2PromptError, match=r"\['rerank'\] need the training prompts"):
        run_methods(["inverter", "rerank"], ctx)  # the inverter did not run first
    with pytest.raises(Logit2PromptError, match="unknown method 'magic'"):
        run_methods(["magic"], ctx)
    base = dict(checkpoint=str(checkpoint / "inv"), prompts="-", out=str(tmp_path / "o"))
    with pytest.raises(Logit2PromptError, match=r"\['fallback'\] need the training prompts"):
        evaluate(EvalConfig(**base, baselines=(), fallback=True))
    with pytest.raises(Logit2PromptError, match="--text-checkpoint"):
        evaluate(EvalConfig(**base, baselines=("text",)))


class _Counting:
    """Counts calls of a function and passes them through."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("num_beams, rerank_beams", [(4, 4), (1, 1), (1, 4)])
def test_shared_work_runs_once_and_matches_each_method_alone(
    checkpoint, user_target, monkeypatch, num_beams, rerank_beams
):
    from logit2prompt.attacks import nearest
    from logit2prompt.attacks.rerank import confident_or_nearest, inverter_with_neighbours
    from logit2prompt.data.collect import collect_vectors
    from logit2prompt.data.store import DistributionStore
    from logit2prompt.models.inverter import Inverter

    inverter = Inverter.from_pretrained(checkpoint / "inv")
    train = DistributionStore(checkpoint / "train")
    vectors = collect_vectors(user_target, TEST, inverter.config.steps, 8)
    real_invert = inverter.invert
    inverter.invert = decode = _Counting(real_invert)
    search = _Counting(nearest.nearest_neighbours)
    monkeypatch.setattr(nearest, "nearest_neighbours", search)
    ctx = MethodContext(
        inverter,
        vectors,
        target=user_target,
        train=train,
        num_beams=num_beams,
        rerank_beams=rerank_beams,
        progress=False,
    )
    preds = run_methods(["nn", "rerank", "fallback", "inverter"], ctx)
    assert list(preds) == [
        methods.INVERTER,
        methods.FALLBACK,
        methods.RERANKED,
        methods.NEAREST,
    ]
    # One neighbour search, as wide as the re-ranker reads; one decode when the beams match.
    assert len(search.calls) == 1 and search.calls[0][0][2] == 3
    assert len(decode.calls) == (1 if num_beams == rerank_beams else 2)
    # Each row is what the method's own function gives when run alone.
    own = real_invert(vectors, num_beams=num_beams)
    assert preds[methods.INVERTER] == own
    assert preds[methods.RERANKED] == inverter_with_neighbours(
        inverter, user_target, train, vectors, beams=rerank_beams
    )
    alone, kept = confident_or_nearest(inverter, train, vectors, own, progress=False)
    assert preds[methods.FALLBACK] == alone
    assert (ctx.notes["fallback_kept"] == kept).all()
    # A blank proposal (EOS first: cheap in NLL) is never kept: the nearest prompt answers.
    blank, kept = confident_or_nearest(
        inverter, train, vectors, [""] * len(own), nats=1e9, progress=False
    )
    assert not kept.any() and blank == nearest.nearest_neighbour(train, vectors)
    assert preds[methods.NEAREST] == nearest.nearest_neighbour(train, vectors)


def test_mbr_picks_the_candidate_the_samples_agree_with():
    from logit2prompt.attacks.mbr import mbr_choice, mbr_select

    samples = [
        "Write a poem about the sea.",
        "Write a short poem about the sea.",
        "Write a poem about cats.",
        "Translate this text into French.",
    ]
    # The greedy output is an outlier: the consensus of the samples wins over it.
    greedy = "How do I fix a flat bicycle tyre quickly?"
    assert mbr_select([greedy], [samples]) == ["Write a poem about the sea."]
    # A greedy output the samples agree with stays (ties go to it, as it comes first).
    assert mbr_choice(["Write a poem about the sea.", *samples], samples) == samples[0]
    # A string drawn twice is supported by its other draw, not by itself.
    twice = ["Tell me a joke.", "Tell me a joke.", "Summarise the article below."]
    assert mbr_choice(twice, twice, "f1") == "Tell me a joke."
    once = ["Tell me a joke.", "Summarise the article below."]
    assert mbr_choice(once, once, "f1") == "Tell me a joke."  # 0 vs 0: the earlier
    # Blank samples agree perfectly with each other, but a blank is never the answer.
    blanks = ["", "", "", "x y"]
    assert mbr_choice(["Write a poem", *blanks], blanks, "f1") == "Write a poem"
    assert mbr_choice(["", " "], ["", " "], "f1") == ""  # nothing else to choose
    with pytest.raises(Logit2PromptError, match="unknown MBR utility"):
        mbr_choice(samples, samples, "rouge")
    with pytest.raises(Logit2PromptError, match="2 greedy outputs but 1"):
        mbr_select(["a", "b"], [samples])


def test_mbr_row_chooses_among_seeded_samples(checkpoint, user_target):
    from logit2prompt.data.collect import collect_vectors
    from logit2prompt.models.inverter import Inverter

    inverter = Inverter.from_pretrained(checkpoint / "inv")
    vectors = collect_vectors(user_target, TEST, inverter.config.steps, 8)

    def run(seed):
        ctx = MethodContext(inverter, vectors, mbr_samples=4, seed=seed, progress=False)
        return run_methods(["mbr", "inverter"], ctx), ctx.samples(4)

    (preds, samples), (again, same) = run(0), run(0)
    assert list(preds) == [methods.INVERTER, methods.MBR]
    assert preds == again and samples == same  # seeded
    assert all(len(s) == 4 for s in samples)
    rows = zip(preds[methods.MBR], preds[methods.INVERTER], samples, strict=True)
    for chosen, greedy, drawn in rows:
        assert chosen in {greedy, *drawn}
    with pytest.raises(Logit2PromptError, match="at least 2 samples"):
        run_methods(["mbr"], MethodContext(inverter, vectors, mbr_samples=1, progress=False))
