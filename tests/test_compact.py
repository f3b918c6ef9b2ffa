"""Compact stores (output-layer coordinates) and multi-step observations end to end."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from logit2prompt.data.collect import collect
from logit2prompt.data.corpus import Corpus, PromptRecord
from logit2prompt.data.store import DistributionStore, StorePlan, StoreWriter, filter_store
from logit2prompt.defenses.chain import parse_defense
from logit2prompt.errors import CheckpointError, StoreError, TargetError, VectorError
from logit2prompt.models.inverter import Inverter
from logit2prompt.targets.base import Target
from logit2prompt.targets.defended import DefendedTarget
from logit2prompt.targets.hf import HFTarget
from logit2prompt.training.trainer import Trainer

from .conftest import FIXTURE_PROMPTS, make_tiny_lm, tiny_train_config


def _corpus(n: int = 20) -> Corpus:
    texts = [FIXTURE_PROMPTS[i % len(FIXTURE_PROMPTS)] + f" ({i})" for i in range(n)]
    return Corpus([PromptRecord(t, {}) for t in texts], "fixture", {})


@pytest.fixture(scope="module")
def tiny_target(tiny_lm_dir):
    return HFTarget.from_pretrained(str(tiny_lm_dir), mode="user", batch_size=8)


@pytest.fixture(scope="module")
def stores(tiny_target, tmp_path_factory):
    """The same 20 prompts at 3 steps, compact and full (fp32)."""
    root = tmp_path_factory.mktemp("stores")
    corpus = _corpus()
    collect(
        tiny_target,
        corpus,
        str(root / "compact"),
        steps=3,
        fmt="compact",
        shard_size=8,
        progress=False,
    )
    collect(
        tiny_target,
        corpus,
        str(root / "full"),
        steps=3,
        fmt="full",
        store_dtype="float32",
        shard_size=8,
        progress=False,
    )
    return DistributionStore(root / "compact"), DistributionStore(root / "full")


def test_compact_round_trip_is_lossless_and_smaller(stores):
    compact, full = stores
    assert compact.compact and not full.compact
    assert compact.encoding["kind"] == "output-layer" and compact.width == 32
    idx = list(range(len(full)))
    rebuilt, reference = compact.vectors(idx), full.vectors(idx)
    assert rebuilt.shape == reference.shape == (20, 3, full.vocab_size)
    assert np.abs(rebuilt - reference).max() < 1e-4
    # Each step is a normalised distribution, and the greedy steps agree.
    assert np.allclose(np.exp(rebuilt).sum(-1), 1.0, atol=1e-4)
    assert (rebuilt.argmax(-1) == reference.argmax(-1)).all()
    assert compact.bytes_per_step * 10 < full.bytes_per_step
    # The first k steps only, decoded from the coordinates of those steps.
    assert np.array_equal(compact.vectors(idx[:4], steps=2), rebuilt[:4, :2])


def test_compact_equals_the_models_own_logits(tiny_target, stores):
    compact, _ = stores
    ids = tiny_target.encode(compact.prompts[:4])
    with torch.inference_mode():
        own = [
            torch.log_softmax(tiny_target.model(input_ids=torch.tensor([x])).logits[0, -1], -1)
            for x in ids
        ]
    assert np.abs(compact.vectors(range(4))[:, 0] - torch.stack(own).numpy()).max() < 1e-4


def test_compact_store_refuses_another_target(stores, tmp_path):
    compact, _ = stores
    other = HFTarget.from_pretrained(str(make_tiny_lm(tmp_path / "other", seed=1)), mode="user")
    fresh = DistributionStore(compact.path)
    with pytest.raises(StoreError, match="weights_sha256"):
        fresh.attach(other)
    with pytest.raises(StoreError, match="basis"):
        fresh.attach(other.output_basis())  # the bare basis: its hash differs
    with pytest.raises(StoreError, match="holds 3 steps"):
        fresh.coordinates([0], steps=4)


def test_defended_target_has_no_compact_form(tiny_target, tmp_path):
    defended = DefendedTarget(tiny_target, parse_defense("topk:5"))
    with pytest.raises(TargetError, match="no lossless compact form"):
        collect(defended, _corpus(4), str(tmp_path / "s"), fmt="compact", progress=False)
    collect(defended, _corpus(4), str(tmp_path / "auto"), progress=False)
    assert not DistributionStore(tmp_path / "auto").compact  # auto falls back to full


def test_compact_rejects_nan_coordinates_and_resume_mismatch(stores, tmp_path):
    compact, _ = stores
    plan = StorePlan(
        compact.fingerprint, "float32", 3, 8, 8, {"sha256": "x"}, encoding=compact.encoding
    )
    writer = StoreWriter(tmp_path / "nan", plan)
    bad = np.zeros((8, 3, compact.width), np.float32)
    bad[2, 1, 5] = np.nan
    with pytest.raises(VectorError, match="NaN or inf"):
        writer.write_shard(0, bad, [f"p{i}" for i in range(8)], [{}] * 8)
    with pytest.raises(StoreError, match="encoding"):
        StoreWriter(
            tmp_path / "nan", StorePlan(compact.fingerprint, "float32", 3, 8, 8, {"sha256": "x"})
        )


@pytest.mark.parametrize("preset", ["tiny", "prefix-lm"])
def test_multi_step_training_and_test_time_extension(stores, tiny_lm_dir, tmp_path, preset):
    compact, full = stores
    extra = {} if preset == "tiny" else {"output_tokenizer": None, "decoder_lr": 1e-3}
    cfg = tiny_train_config(
        compact.path,
        tmp_path / "model",
        tiny_lm_dir,
        preset=preset,
        steps=2,
        max_steps=4,
        per_device_batch_size=4,
        **extra,
    )
    if preset == "prefix-lm":
        cfg.overrides = {"max_length": 24, "embed_hidden": 32, "prefix_length": 4}
    model = Trainer(cfg).run()
    assert model.config.steps == 2 and model.config.step_positions >= 3
    if preset == "prefix-lm":
        assert model.config.tokens_per_step == 2
        assert model.basis.shape[0] == compact.vocab_size  # one basis for every step
    loaded = Inverter.from_pretrained(tmp_path / "model")
    vectors = full.vectors(range(4))
    # Trained on 2 steps; reads 1, 2 or all 3 (test-time extension), never more than given.
    for k in (1, 2, 3):
        out = loaded.invert(vectors, steps=k)
        assert len(out) == 4 and all(isinstance(t, str) for t in out)
    assert loaded.invert(vectors) == loaded.invert(vectors[:, :2])  # default: trained steps
    with pytest.raises(VectorError, match="4 steps asked for but the vectors hold 3"):
        loaded.invert(vectors, steps=4)
    bad = vectors.copy()
    bad[0, 1, 0] = np.inf
    with pytest.raises(VectorError, match="NaN or inf"):
        loaded.invert(bad)
    # The same inverter and loss after a reload.
    x = torch.from_numpy(vectors[:, :2].reshape(4, -1))
    labels = torch.tensor([[5, 6, loaded.config.eos_token_id]] * 4)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x, labels), loaded(x, labels), atol=1e-4)


def test_init_from_extends_a_prefix_lm_to_more_steps(stores, tiny_lm_dir, tmp_path):
    """A 2-step prefix-lm fine-tuned on 3 steps keeps its pseudo-tokens per step (so every
    weight carries over) and then reads 3 steps by default; a T5 inverter cannot."""
    compact, full = stores
    kw = dict(output_tokenizer=None, decoder_lr=1e-3, max_steps=2, per_device_batch_size=4)
    overrides = {"max_length": 24, "embed_hidden": 32, "prefix_length": 4}
    cfg = tiny_train_config(compact.path, tmp_path / "two", tiny_lm_dir, preset="prefix-lm", **kw)
    cfg.steps, cfg.overrides = 2, overrides
    two = Trainer(cfg).run()
    assert two.config.tokens_per_step == 2
    cfg = tiny_train_config(compact.path, tmp_path / "three", tiny_lm_dir, preset="prefix-lm", **kw)
    cfg.steps, cfg.init_from = 3, str(tmp_path / "two")
    # ... and reads each step's greedy token as text too (no new weight).
    cfg.overrides = {"max_length": 24, "reply_tokens": True}
    trainer = Trainer(cfg)
    assert trainer.model.config.steps == 3 and trainer.model.config.tokens_per_step == 2
    assert trainer.model.config.reply_tokens
    assert torch.equal(trainer.model.embed[0].weight, two.embed[0].weight)  # carried over
    trainer.run()
    loaded = Inverter.from_pretrained(tmp_path / "three")
    assert loaded.config.steps == 3 and loaded.config.reply_tokens
    vectors = full.vectors(range(4))
    assert len(loaded.invert(vectors)) == 4
    x = torch.from_numpy(vectors.reshape(4, -1))
    with torch.no_grad():
        prefix = loaded.encode_inputs(x).view(4, 3, 3, -1)  # per step: its token, 2 pseudo
        words = loaded.lm.get_input_embeddings()(torch.from_numpy(vectors.argmax(-1)))
    assert torch.allclose(prefix[:, :, 0], words)
    with pytest.raises(ValueError, match="whole vectors"):
        replace(loaded.config, subset={"kind": "x"})
    Trainer(
        tiny_train_config(compact.path, tmp_path / "t5", tiny_lm_dir, steps=2, max_steps=1)
    ).run()
    cfg = tiny_train_config(compact.path, tmp_path / "t5b", tiny_lm_dir, steps=3, max_steps=1)
    cfg.init_from = str(tmp_path / "t5")
    with pytest.raises(CheckpointError, match="reads \\(vocab, steps\\)"):
        Trainer(cfg)


def test_a_text_only_prefix_lm_reads_the_greedy_reply_alone(stores, tiny_lm_dir, tmp_path):
    """pseudo_tokens=false: the prefix is the decoder's embedding of each step's argmax, so
    two observations with the same greedy reply give the same prompt, and no MLP is built."""
    compact, full = stores
    cfg = tiny_train_config(
        compact.path,
        tmp_path / "text",
        tiny_lm_dir,
        preset="prefix-lm",
        output_tokenizer=None,
        max_steps=2,
        per_device_batch_size=4,
        lora_rank=4,
    )
    cfg.steps = 3
    cfg.overrides = {"max_length": 24, "reply_tokens": True, "pseudo_tokens": False}
    trainer = Trainer(cfg)
    assert trainer.model.embed is None
    assert not any(
        n.startswith(("embed.", "step_embedding")) for n, _ in trainer.model.named_parameters()
    )
    trainer.run()
    loaded = Inverter.from_pretrained(tmp_path / "text")
    assert not loaded.config.pseudo_tokens and loaded.config.tokens_per_step == 0
    vectors = full.vectors(range(4))
    x = torch.from_numpy(vectors.reshape(4, -1))
    # Another observation with the same argmax at every step: sharper, shifted.
    y = torch.from_numpy((vectors * 3 - 1).reshape(4, -1))
    with torch.no_grad():
        prefix = loaded.encode_inputs(x)
        words = loaded.lm.get_input_embeddings()(torch.from_numpy(vectors.argmax(-1)))
        assert prefix.shape == (4, 3, words.shape[-1])
        assert torch.equal(prefix, words) and torch.equal(loaded.encode_inputs(y), prefix)
    assert loaded.invert(vectors) == loaded.invert(vectors * 3 - 1)
    assert loaded.memory is None
    # Exported with a memory of its store: the nearest-neighbour baseline runs beside it.
    from logit2prompt.attacks.nearest import MemoryNeighbours
    from logit2prompt.cli.main import main

    args = ["export", "--checkpoint", str(tmp_path / "text"), "--out", str(tmp_path / "slim")]
    assert main([*args, "--memory-data", str(full.path)]) == 0
    slim = Inverter.from_pretrained(tmp_path / "slim")
    assert slim.memory is not None and slim.memory.prompts == full.prompts
    assert slim.invert(vectors) == loaded.invert(vectors)
    assert [row[0] for row in MemoryNeighbours(slim).search(vectors, 1)] == [0, 1, 2, 3]
    cfg.overrides = {"max_length": 24, "pseudo_tokens": False}
    with pytest.raises(ValueError, match="nothing to read"):
        Trainer(cfg)


def test_train_steps_beyond_the_store_are_refused(stores, tiny_lm_dir, tmp_path):
    compact, _ = stores
    cfg = tiny_train_config(compact.path, tmp_path / "m", tiny_lm_dir, steps=4)
    with pytest.raises(StoreError, match="holds 3 steps"):
        Trainer(cfg)


@pytest.mark.embedded
def test_embedded_default_compact_is_lossless(tmp_path):
    from logit2prompt.targets import load_target

    target = load_target(dtype="float32", batch_size=4)
    corpus = _corpus(4)
    collect(target, corpus, str(tmp_path / "c"), steps=2, progress=False)
    store = DistributionStore(tmp_path / "c")
    assert store.compact and store.width == 576
    full = target.next_token_logprobs(corpus.texts, steps=2).numpy()
    assert np.abs(store.vectors(range(4)) - full).max() < 1e-3


def test_info_reports_format_and_bytes_per_step(stores, capsys):
    import json

    from logit2prompt.cli.main import main

    compact, full = stores
    for store, fmt, per_step in ((compact, "output-layer", 32 * 4), (full, "full", None)):
        assert main(["info", str(store.path)]) == 0
        summary = json.loads(capsys.readouterr().out)["summary"]
        assert summary["format"].startswith(fmt)
        expected = per_step or full.vocab_size * 4
        assert summary["bytes_per_prompt_step"] == expected
        assert summary["bytes_per_prompt"] == 3 * expected


class _Blind(Target):
    """The tiny target seen as an API: log-probs only, no weights, no output layer."""

    def __init__(self, inner):
        self.inner, self.fingerprint = inner, replace(inner.fingerprint, name="blind")

    def next_token_logprobs(self, prompts, steps=None):
        return self.inner.next_token_logprobs(prompts, steps=steps)

    def count_tokens(self, prompts):
        return self.inner.count_tokens(prompts)


def test_target_without_weights_gets_a_fitted_basis(tiny_target, tmp_path):
    blind = _Blind(tiny_target)
    corpus = _corpus(60)  # 60 prompts x 2 steps: rows enough to read the rank (<= 33)
    collect(blind, corpus, str(tmp_path / "fit"), steps=2, shard_size=16, progress=False)
    store = DistributionStore(tmp_path / "fit")
    assert store.encoding["kind"] == "fitted" and store.width <= 33
    assert (tmp_path / "fit" / "basis.npy").is_file()
    reference = tiny_target.next_token_logprobs(corpus.texts, steps=2).numpy()
    assert np.abs(store.vectors(range(60)) - reference).max() < 1e-3
    # A filtered store carries the basis its coordinates need.
    filter_store(tmp_path / "part", tmp_path / "fit", lambda p: p in corpus.texts[10:20])
    part = DistributionStore(tmp_path / "part")
    assert np.abs(part.vectors(range(10)) - reference[10:20]).max() < 1e-3
    # Resuming reads the saved basis rather than fitting another.
    again = collect(blind, corpus, str(tmp_path / "fit"), steps=2, shard_size=16, progress=False)
    assert again.shards_written == 0
    # Too few vectors to tell the rank: auto stores full vectors, compact is refused.
    collect(blind, _corpus(6), str(tmp_path / "few"), steps=1, progress=False)
    assert not DistributionStore(tmp_path / "few").compact
    with pytest.raises(TargetError, match="no lossless basis"):
        collect(blind, _corpus(6), str(tmp_path / "few2"), steps=1, fmt="compact", progress=False)


def test_a_noisy_target_fails_the_fitted_basis_check(tiny_target, tmp_path):
    noisy = _Blind(tiny_target)
    noisy.next_token_logprobs = lambda prompts, steps=None: (
        tiny_target.next_token_logprobs(prompts, steps=steps)
        + 0.05 * torch.randn(len(prompts), steps or 1, tiny_target.vocab_size)
    )
    with pytest.raises(TargetError, match="held-out error"):
        collect(noisy, _corpus(60), str(tmp_path / "n"), steps=2, fmt="compact", progress=False)
