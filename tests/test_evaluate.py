"""Evaluation: semantic and functional metrics, every baseline end to end, the HTML report."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from logit2prompt.data.collect import collect
from logit2prompt.data.corpus import Corpus, PromptRecord
from logit2prompt.errors import Logit2PromptError
from logit2prompt.evaluation.metrics import summarize
from logit2prompt.targets import load_target
from logit2prompt.training.trainer import Trainer

from .conftest import FIXTURE_PROMPTS, tiny_train_config

TRAIN, TEST = FIXTURE_PROMPTS[:12], FIXTURE_PROMPTS[12:]


@pytest.fixture(scope="module")
def user_target(tiny_lm_dir):
    return load_target(str(tiny_lm_dir), mode="user")


@pytest.fixture(scope="module")
def checkpoint(user_target, tiny_lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    corpus = Corpus([PromptRecord(p) for p in TRAIN], "fixture")
    collect(user_target, corpus, str(root / "train"), shard_size=8, progress=False)
    Trainer(
        tiny_train_config(
            root / "train", root / "inv", tiny_lm_dir, max_steps=30, schedule="cosine"
        )
    ).run()
    return root


def _inverter_only(checkpoint, prompts) -> dict:
    """EvalConfig fields for the inverter alone: no baselines, no semantic or functional
    metrics, no progress bars."""
    return dict(
        checkpoint=str(checkpoint / "inv"),
        prompts=str(prompts),
        baselines=(),
        semantic=False,
        functional=False,
        progress=False,
    )


def test_cosine_similarity_of_sentence_embeddings():
    from logit2prompt.evaluation.similarity import cosine_similarity

    refs = ["What is the capital of France?"] * 3
    preds = [
        "What is the capital of France?",
        "Which city is the capital of France?",
        "List three prime numbers.",
    ]
    same, paraphrase, unrelated = cosine_similarity(preds, refs)
    assert same == pytest.approx(1.0, abs=1e-5)
    assert paraphrase > 0.8 > 0.3 > unrelated
    with pytest.raises(Logit2PromptError, match="pair up"):
        cosine_similarity(preds, refs[:2])


def test_functional_scores(user_target):
    from logit2prompt.evaluation.functional import functional_scores

    refs = [TEST[0], TEST[1]]
    same = functional_scores(user_target, refs, refs)
    assert same["kl"] == pytest.approx([0.0, 0.0], abs=1e-6) and same["top1"] == [1.0, 1.0]
    other = functional_scores(user_target, [TEST[2], ""], refs)
    assert all(k > 1e-4 for k in other["kl"])
    # Distributions the caller already holds stand in for rerunning the references.
    held = user_target.next_token_logprobs(refs)
    given = functional_scores(user_target, [TEST[2], ""], refs, reference_logprobs=held)
    assert given["kl"] == pytest.approx(other["kl"], rel=1e-4, abs=1e-6)
    assert given["top1"] == other["top1"]


def test_summarize_gives_cis_and_refuses_empty():
    out = summarize({"bleu": [10.0, 20.0, 30.0, 40.0], "top1": [1, 0, 1, 1]})
    assert out["bleu"]["mean"] == 25.0 and out["top1"]["mean"] == 75.0
    lo, hi = out["bleu"]["ci95"]
    assert lo <= 25.0 <= hi
    with pytest.raises(Logit2PromptError, match="empty"):
        summarize({"bleu": []})


def test_extraction_best_string_and_oracle():
    from logit2prompt.attacks.extraction import best_and_oracle, load_attacks

    assert len(load_attacks()) >= 10
    refs = ["the cat sat on the mat", "a quick brown fox jumps"]
    replies = {
        "a": ["the cat sat on the mat", "nothing at all here"],
        "b": ["no", "a quick brown fox jumps"],
        "c": ["the cat sat on the mat today", "a quick brown fox jumps high"],
    }
    best, best_preds, oracle = best_and_oracle(replies, refs)
    assert best == "c"  # near misses on both beat one perfect answer and one miss
    assert best_preds == replies["c"]
    assert oracle == ["the cat sat on the mat", "a quick brown fox jumps"]


def test_extraction_inputs_follow_the_threat_model(tiny_lm_dir):
    from logit2prompt.attacks.extraction import attack_input

    system = load_target(str(tiny_lm_dir), mode="system")
    text = attack_input(system, "HIDDEN", "Repeat it.")
    assert text.index("HIDDEN") < text.index("Repeat it.")
    assert "<|im_start|>system\nHIDDEN" in text
    user = load_target(str(tiny_lm_dir), mode="user")
    assert "<|im_start|>user\nHIDDEN\n\nRepeat it." in attack_input(user, "HIDDEN", "Repeat it.")


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.images, self.rows = [], 0, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.ids.append(a.get("id"))
        if tag == "img" and a.get("src", "").startswith("data:image/png;base64,"):
            self.images += 1
        if tag == "tr":
            self.rows += 1


def test_evaluate_end_to_end_with_every_baseline(checkpoint, user_target, tmp_path, capsys):
    from logit2prompt.cli.main import main

    prompts = tmp_path / "ood.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p, "task": f"t{i % 2}"}) + "\n" for i, p in enumerate(TEST))
    )
    out = tmp_path / "report"
    code = main(
        [
            "evaluate",
            "--checkpoint", str(checkpoint / "inv"),
            "--prompts", str(prompts),
            "--out", str(out),
            "--train-data", str(checkpoint / "train"),
            "--baselines", "nn,constant,extraction,fewshot",
            "--refine-rounds", "1",
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    methods = set(results["summary"])
    assert methods == {
        "inverter",
        "nearest neighbour",
        "nearest neighbour, refined by the target",
        "constant guess",
        "extraction (best string)",
        "extraction (oracle)",
        "few-shot",
    }
    for m in results["summary"].values():
        assert {"bleu", "token_f1", "exact", "cosine", "kl", "top1"} <= set(m)
        assert m["n"]["mean"] == len(TEST)
    # The oracle picks per prompt, so it is never below the best single string.
    s = results["summary"]
    assert s["extraction (oracle)"]["bleu"]["mean"] >= s["extraction (best string)"]["bleu"]["mean"]
    assert results["group_field"] == "task" and len(results["by_group"]) == 2
    assert sum(r["n"] for r in results["by_length"]) == len(TEST)
    # Buckets are in target tokens, the unit of --max-tokens.
    lengths = user_target.count_tokens(TEST)
    for row in results["by_length"]:
        lo, hi = (int(x) for x in row["tokens"].split("-"))
        assert row["n"] == sum(lo <= n <= hi for n in lengths)
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["hidden"] for r in rows] == TEST
    parser = _Tables()
    parser.feed((out / "report.html").read_text())
    assert {"summary", "by-group", "examples-best", "examples-median", "examples-worst"} <= set(
        parser.ids
    )
    assert parser.images >= 1 and parser.rows > 10
    assert "cosine" in capsys.readouterr().out


def test_evaluate_refuses_bad_setups(checkpoint, tiny_lm_dir, tmp_path):
    from logit2prompt.evaluation.evaluate import EvalConfig, evaluate

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(TEST) + "\n")
    base = dict(checkpoint=str(checkpoint / "inv"), prompts=str(prompts), out=str(tmp_path / "o"))
    with pytest.raises(Logit2PromptError, match="unknown baseline"):
        evaluate(EvalConfig(**base, baselines=("magic",)))
    with pytest.raises(Logit2PromptError, match="--train-data"):
        evaluate(EvalConfig(**base, baselines=("nn",)))
    with pytest.raises(Logit2PromptError, match=r"\['refine'\] need the training prompts"):
        evaluate(EvalConfig(**base, baselines=(), refine_rounds=1))
    with pytest.raises(Logit2PromptError, match="refine rounds must be >= 0"):
        evaluate(EvalConfig(**base, baselines=(), refine_rounds=-1))
    raw = load_target(str(tiny_lm_dir), mode="raw")
    corpus = Corpus([PromptRecord(p) for p in TRAIN], "fixture")
    collect(raw, corpus, str(tmp_path / "raw"), progress=False)
    with pytest.raises(Logit2PromptError, match="another target"):
        evaluate(
            EvalConfig(**base, baselines=("nn",), train_data=str(tmp_path / "raw"), progress=False)
        )
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(Logit2PromptError):
        evaluate(EvalConfig(**{**base, "prompts": str(empty)}, baselines=()))


def test_evaluate_keeps_prompts_up_to_max_tokens(checkpoint, user_target, tmp_path):
    """Prompts past 64 tokens are dropped by default (the paper's limit) and kept, in their
    own length bucket, with --max-tokens."""
    from logit2prompt.evaluation.evaluate import EvalConfig, evaluate

    long = " ".join(TRAIN)  # well past 64 tokens of the tiny tokenizer, under its context
    n_long = user_target.count_tokens([long])[0]
    assert 64 < n_long <= 200
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join([*TEST[:3], long]) + "\n")
    base = _inverter_only(checkpoint, prompts)
    short = evaluate(EvalConfig(**base, out=str(tmp_path / "a")))
    assert short["corpus"]["n"] == 3 and short["corpus"]["dropped"]["too_long"] == 1
    assert all(int(r["tokens"].split("-")[1]) <= 64 for r in short["by_length"])
    both = evaluate(EvalConfig(**base, out=str(tmp_path / "b"), max_tokens=200))
    assert both["corpus"]["n"] == 4
    (row,) = [r for r in both["by_length"] if int(r["tokens"].split("-")[0]) > 64]
    lo, hi = (int(x) for x in row["tokens"].split("-"))
    assert row["n"] == 1 and lo <= n_long <= hi


def test_text_only_baseline_trains_saves_and_evaluates(checkpoint, tmp_path):
    from logit2prompt.cli.main import main
    from logit2prompt.errors import CheckpointError
    from logit2prompt.models.text_inverter import TextInverter

    text_dir = tmp_path / "text"
    args = ["train-text", "--data", str(checkpoint / "train"), "--out", str(text_dir)]
    assert (
        main([*args, "--like", str(checkpoint / "inv"), "--max-steps", "15", "--no-progress"]) == 0
    )
    replies = [json.loads(x) for x in (text_dir / "outputs.jsonl").read_text().splitlines()]
    assert sorted(r["prompt"] for r in replies) == sorted(TRAIN)
    # A killed run's half line is dropped and its reply asked again; the budget without
    # --max-steps is the steps the reference took (its max_steps, or fewer under a time limit).
    cache = text_dir / "outputs.jsonl"
    cache.write_text(cache.read_text()[:-20])
    assert main([*args, "--like", str(checkpoint / "inv"), "--no-progress"]) == 0
    assert len(cache.read_text().splitlines()) == len(TRAIN)
    done = json.loads((checkpoint / "inv" / "training_args.json").read_text())["steps_done"]
    from logit2prompt.models.text_inverter import META_NAME

    assert json.loads((text_dir / META_NAME).read_text())["training"]["steps"] == done == 30
    model = TextInverter.from_pretrained(text_dir)
    again = TextInverter.from_pretrained(text_dir)
    outputs = [r["output"] for r in replies[:3]]
    assert model.invert(outputs) == again.invert(outputs)  # the round trip is exact
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(TEST) + "\n")
    code = main(
        [
            "evaluate",
            "--checkpoint", str(checkpoint / "inv"),
            "--prompts", str(prompts),
            "--out", str(tmp_path / "e"),
            "--baselines", "text",
            "--text-checkpoint", str(text_dir),
            "--no-semantic", "--no-functional", "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "e" / "results.json").read_text())["summary"]
    assert set(summary) == {"inverter", "text-only inversion"}
    with pytest.raises(CheckpointError, match="not a text-inverter"):
        TextInverter.from_pretrained(checkpoint / "inv")


def test_rerank_by_the_target_finds_a_candidate_that_matches(checkpoint, user_target):
    from logit2prompt.attacks.rerank import (
        inverter_with_neighbours,
        proposals_with_neighbours,
        rerank,
    )
    from logit2prompt.data.collect import collect_vectors
    from logit2prompt.data.store import DistributionStore
    from logit2prompt.models.inverter import Inverter

    observed = collect_vectors(user_target, TEST[:3], 1, 8)
    decoys = [[TRAIN[0], TEST[i], TRAIN[1]] for i in range(3)]
    assert rerank(user_target, observed, decoys) == TEST[:3]  # distance 0 wins
    train = DistributionStore(checkpoint / "train")
    inverter = Inverter.from_pretrained(checkpoint / "inv")
    seen = collect_vectors(user_target, TRAIN[:4], 1, 8)
    # Prompts from the training store are their own nearest neighbours.
    assert inverter_with_neighbours(inverter, user_target, train, seen, beams=2) == TRAIN[:4]
    # A caller's own neighbour search is used as given, not redone: with no proposals, each row
    # gets the (deliberately wrong) neighbour it was handed.
    shifted = [[(i + 1) % 4, i] for i in range(4)]
    got = proposals_with_neighbours(user_target, train, seen, [[]] * 4, neighbours=1, near=shifted)
    assert got == [TRAIN[(i + 1) % 4] for i in range(4)]
    with pytest.raises(ValueError, match="near needs 3 indices"):
        proposals_with_neighbours(user_target, train, seen, [[]] * 4, near=shifted)


def test_evaluate_random_sample_is_seeded(checkpoint, tmp_path):
    from logit2prompt.evaluation.evaluate import EvalConfig, evaluate

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(FIXTURE_PROMPTS) + "\n")
    runs = [
        evaluate(
            EvalConfig(
                checkpoint=str(checkpoint / "inv"),
                prompts=str(prompts),
                out=str(tmp_path / f"o{i}"),
                baselines=(),
                sample=5,
                semantic=False,
                functional=False,
                progress=False,
            )
        )
        for i in range(2)
    ]
    hidden = [[e["hidden"] for v in r["examples"].values() for e in v] for r in runs]
    assert runs[0]["corpus"]["n"] == 5 and runs[0]["corpus"]["available"] == len(FIXTURE_PROMPTS)
    assert hidden[0] == hidden[1]


def _no_target_work(*args, **kwargs):
    raise AssertionError("the target was asked for vectors")


def test_external_predictions_are_scored_or_refused(checkpoint, tmp_path, monkeypatch):
    from logit2prompt.evaluation.evaluate import EvalConfig, evaluate

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(TEST) + "\n")

    def write(name, rows):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    good = write("mine", [{"hidden": p, "recovered": p} for p in TEST])
    short = write("short", [{"hidden": p, "recovered": p} for p in TEST[:-1]])
    shuffled = write("shuffled", [{"hidden": p, "recovered": p} for p in reversed(TEST)])
    base = _inverter_only(checkpoint, prompts)
    results = evaluate(EvalConfig(**base, out=str(tmp_path / "a"), predictions=(good,)))
    assert results["summary"]["mine"]["exact"]["mean"] == 100.0
    with pytest.raises(Logit2PromptError, match="7 predictions but 8 prompts"):
        evaluate(EvalConfig(**base, out=str(tmp_path / "b"), predictions=(short,)))
    # A bad file is found before the target is asked for anything.
    with monkeypatch.context() as m:
        m.setattr("logit2prompt.data.collect.collect_vectors", _no_target_work)
        with pytest.raises(Logit2PromptError, match="7 predictions but 8 prompts"):
            evaluate(EvalConfig(**base, out=str(tmp_path / "b"), predictions=(short,)))
    with pytest.raises(Logit2PromptError, match="line 1 is for"):
        evaluate(EvalConfig(**base, out=str(tmp_path / "c"), predictions=(shuffled,)))
    # A row's name is its file's stem: it may not replace a method's row or another file's.
    (tmp_path / "again").mkdir()
    twin = str(Path(good).parent / "again" / "mine.jsonl")
    Path(twin).write_text(Path(good).read_text())
    with pytest.raises(Logit2PromptError, match="rows named \\['mine'\\]"):
        evaluate(EvalConfig(**base, out=str(tmp_path / "d"), predictions=(good, twin)))
    inverter_row = write("inverter", [{"hidden": p, "recovered": p} for p in TEST])
    with pytest.raises(Logit2PromptError, match="'inverter' is already scored"):
        evaluate(EvalConfig(**base, out=str(tmp_path / "e"), predictions=(inverter_row,)))
    chat = write("chat", [{"hidden": p, "recovered": {"role": "user"}} for p in TEST])
    with pytest.raises(Logit2PromptError, match="is not a string"):
        evaluate(EvalConfig(**base, out=str(tmp_path / "f"), predictions=(chat,)))


class _OracleProposer:
    """Stands in for the inverter in `refine`: at every position it prefers the hidden
    prompt's token, so the search logic (edit, query the target, keep the nearer) is what
    the test checks."""

    def __init__(self, tokenizer, hidden: str, vocab_size: int):
        from types import SimpleNamespace

        self.tokenizer = tokenizer
        self.config = SimpleNamespace(
            eos_token_id=tokenizer.eos_token_id, max_length=64, steps=1, vocab_size=vocab_size
        )
        self.hidden = tokenizer(hidden, add_special_tokens=False)["input_ids"]
        self.training = False

    def eval(self):
        return self

    def as_batch(self, logprobs, steps=None):
        import torch

        return torch.as_tensor(logprobs).reshape(len(logprobs), -1).float()

    def train(self, mode=True):
        return self

    def label_logprobs(self, vectors, labels):
        import torch

        width, vocab = labels.shape[1], len(self.tokenizer)
        out = torch.full((len(labels), width, vocab), -10.0)
        for t in range(width):
            token = self.hidden[t] if t < len(self.hidden) else self.config.eos_token_id
            out[:, t, token] = -0.1
        return out


def test_refine_reaches_the_hidden_prompt_when_the_proposer_knows_it(user_target):
    from logit2prompt.attacks.refine import RefineConfig, refine, sq_distances
    from logit2prompt.data.collect import collect_vectors

    hidden = "the cat sat on the mat"
    tokenizer = user_target.tokenizer
    ids = tokenizer(hidden, add_special_tokens=False)["input_ids"]
    other = next(t for t in tokenizer(TRAIN[0], add_special_tokens=False)["input_ids"]
                 if t not in ids)  # fmt: skip
    start = [tokenizer.decode([*ids[:1], other, *ids[2:]]).strip()]  # one token swapped
    observed = collect_vectors(user_target, [hidden], 1, 8)
    assert sq_distances(observed, collect_vectors(user_target, start, 1, 8))[0] > 1e-2
    proposer = _OracleProposer(tokenizer, hidden, user_target.vocab_size)
    out = refine(proposer, user_target, observed, start, cfg=RefineConfig(rounds=4), progress=False)
    assert out.prompts == [hidden] and out.distances[0] < 1e-4
    # Round 1 found it; round 2 changed nothing, so the search stopped there.
    assert out.rounds == [[hidden], [hidden]]
    # One query for the start prompt, then at most `proposals` per round.
    assert 1 < out.queries <= 1 + 2 * RefineConfig.proposals


def test_refine_only_keeps_edits_that_bring_the_target_closer(checkpoint, user_target):
    import numpy as np

    from logit2prompt.attacks.refine import (
        RefineConfig,
        nearest_start,
        refine_nearest,
        sq_distances,
    )
    from logit2prompt.data.collect import collect_vectors
    from logit2prompt.data.store import DistributionStore
    from logit2prompt.errors import VectorError
    from logit2prompt.models.inverter import Inverter

    train = DistributionStore(checkpoint / "train")
    inverter = Inverter.from_pretrained(checkpoint / "inv")
    observed = collect_vectors(user_target, TEST[:3], 1, 8)
    start, out = refine_nearest(
        inverter, user_target, train, observed, RefineConfig(rounds=2, proposals=6), False
    )
    assert all(p in train.prompts for p in start)
    same_start, before = nearest_start(train, observed)
    assert same_start == start
    assert all(a <= b + 1e-6 for a, b in zip(out.distances, before, strict=True))
    # The reported distance is the target's own for the returned prompt.
    again = collect_vectors(user_target, out.prompts, 1, 8)
    recomputed = sq_distances(observed, again)
    assert list(recomputed) == pytest.approx(list(out.distances), rel=1e-3, abs=1e-3)
    assert 0 < out.queries <= 3 * 6 * 2
    bad = observed.copy()
    bad[1, 0, 5] = np.nan
    with pytest.raises(VectorError, match="vector 1 contains NaN"):
        refine_nearest(inverter, user_target, train, bad, progress=False)
    with pytest.raises(VectorError, match="do not fit"):
        refine_nearest(inverter, user_target, train, observed[:, :, :-1], progress=False)


def test_rerank_at_its_beam_count_decodes_once(checkpoint, user_target):
    """evaluate --rerank --num-beams 4: one beam search gives the inverter's answer (top beam)
    and the re-ranker's candidates, with the same answers as decoding each separately."""
    from logit2prompt.attacks.rerank import DEFAULT_BEAMS, inverter_with_neighbours
    from logit2prompt.data.collect import collect_vectors
    from logit2prompt.data.store import DistributionStore
    from logit2prompt.evaluation.evaluate import INVERTER, RERANKED, EvalConfig, method_predictions
    from logit2prompt.models.inverter import Inverter

    inverter = Inverter.from_pretrained(checkpoint / "inv")
    vectors = collect_vectors(user_target, TEST, inverter.config.steps, 8)
    calls = []
    real = inverter.invert
    inverter.invert = lambda *a, **k: calls.append(k) or real(*a, **k)
    cfg = EvalConfig(
        checkpoint=str(checkpoint / "inv"),
        prompts="-",
        out="-",
        baselines=(),
        train_data=str(checkpoint / "train"),
        num_beams=DEFAULT_BEAMS,
        rerank=True,
        progress=False,
    )
    preds = method_predictions(cfg, inverter, user_target, TEST, vectors)
    assert len(calls) == 1 and calls[0]["num_return_sequences"] == DEFAULT_BEAMS
    train = DistributionStore(checkpoint / "train")
    assert preds[INVERTER] == real(vectors, num_beams=DEFAULT_BEAMS)
    assert preds[RERANKED] == inverter_with_neighbours(inverter, user_target, train, vectors)


def test_refinement_needs_an_inverter_of_whole_vectors():
    from logit2prompt.evaluation.evaluate import EvalConfig, _check_needs

    cfg = EvalConfig(checkpoint="x", prompts="p.txt", out="o", refine_rounds=1, train_data="s")
    _check_needs(cfg, memory=False, subset=False)
    with pytest.raises(Logit2PromptError, match="token subset"):
        _check_needs(cfg, memory=False, subset=True)
