"""Token-subset observations: choice, reconstruction, stores, inverters and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from logit2prompt.data.collect import collect
from logit2prompt.data.corpus import Corpus, PromptRecord
from logit2prompt.data.store import DistributionStore
from logit2prompt.errors import StoreError, TargetError, VectorError
from logit2prompt.targets.hf import HFTarget
from logit2prompt.targets.subset import (
    SubsetDecoder,
    TokenSubset,
    eligible_ids,
    observe_coordinates,
)

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Translate 'good morning' into German.",
    "List three prime numbers.",
    "Summarise the plot of Hamlet.",
    "Explain recursion to a child.",
]


@pytest.fixture(scope="module")
def target(tiny_lm_dir):
    return HFTarget.from_pretrained(str(tiny_lm_dir), mode="user")


@pytest.fixture(scope="module")
def subset(target):
    return TokenSubset.choose(target.tokenizer, target.vocab_size, 52, seed=3)


def test_choice_is_seeded_unambiguous_and_recorded(target, subset):
    again = TokenSubset.choose(target.tokenizer, target.vocab_size, 52, seed=3)
    other = TokenSubset.choose(target.tokenizer, target.vocab_size, 52, seed=4)
    assert again == subset and other.ids != subset.ids
    assert list(subset.ids) == sorted(set(subset.ids))
    assert set(subset.ids) <= set(eligible_ids(target.tokenizer, target.vocab_size))
    record = json.loads(json.dumps(subset.encoding()))
    assert TokenSubset.from_encoding(record) == subset
    record["ids"][0] = record["ids"][1] + 1
    with pytest.raises(VectorError, match="corrupted"):
        TokenSubset.from_encoding(record)
    assert "token subset" in "; ".join(subset.differences(other))
    with pytest.raises(VectorError, match="2 to"):
        TokenSubset.choose(target.tokenizer, target.vocab_size, 10**6)


def test_observation_rebuilds_the_whole_vector(target, subset):
    full = target.next_token_logprobs(PROMPTS)
    obs = subset.observe(full)
    assert obs.shape == (len(PROMPTS), subset.size)
    assert torch.allclose(obs.mean(-1), torch.zeros(len(PROMPTS)), atol=1e-5)
    # Any additive constant (what "gap" cannot see) gives the same observation.
    assert torch.allclose(subset.observe(full + 3.0), obs, atol=1e-5)
    decoder = SubsetDecoder(subset, target.output_basis())
    rebuilt, residual = decoder.decode(obs.numpy())
    assert np.abs(rebuilt - full.numpy()).max() <= 1e-4
    assert residual.max() <= 1e-4
    # Straight from hidden states (what a compact store keeps), no full vector needed.
    _, states = target.forward_ids(target.encode(PROMPTS), 1, hidden=True)
    direct = observe_coordinates(target.output_basis(), states.numpy(), subset)[:, 0]
    assert np.abs(direct - obs.numpy()).max() <= 1e-4


def test_reconstruction_refuses_noise_and_too_few_tokens(target, subset):
    obs = subset.observe(target.next_token_logprobs(PROMPTS)).numpy()
    noisy = obs + np.random.default_rng(0).normal(0, 0.01, obs.shape).astype(np.float32)
    decoder = SubsetDecoder(subset, target.output_basis())
    with pytest.raises(VectorError, match="does not lie in the basis"):
        decoder.decode(noisy)
    obs[1, 0] = np.nan  # a NaN residual is no pass (NaN > tolerance is False)
    with pytest.raises(VectorError, match="observation 1 does not lie"):
        decoder.decode(obs)
    small = TokenSubset.choose(target.tokenizer, target.vocab_size, 20)
    with pytest.raises(VectorError, match="at least 33"):
        SubsetDecoder(small, target.output_basis())


def collect_subset(target, corpus, out, size: int, seed: int) -> None:
    collect(
        target,
        corpus,
        str(out),
        fmt="subset",
        subset_size=size,
        subset_seed=seed,
        steps=2,
        shard_size=4,
        progress=False,
    )


def test_subset_store_from_a_white_box_target(target, subset, tmp_path):
    corpus = Corpus([PromptRecord(p) for p in PROMPTS], source="test")
    out = tmp_path / "store"
    collect_subset(target, corpus, out, 52, 3)
    store = DistributionStore(out)
    assert store.subset == subset and store.width == 52 and store.steps == 2
    assert store.manifest["encoding"]["kind"] == "subset"
    full = target.next_token_logprobs(store.prompts, steps=2).numpy()
    got = store.observations(range(len(store)), None, subset)
    assert np.abs(got - subset.observe(full)).max() <= 1e-4
    # Full vectors come back through the target's own output layer.
    store.attach(target)
    assert np.abs(store.vectors(range(len(store))) - full).max() <= 1e-4
    other = TokenSubset.choose(target.tokenizer, target.vocab_size, 52, seed=4)
    with pytest.raises(StoreError, match="observes 52 tokens"):
        store.observations([0], None, other)
    # A resumed collection keeps the recorded subset whatever the flags say.
    collect_subset(target, corpus, out, 60, 9)
    assert DistributionStore(out).subset == subset
    # Full and compact stores give the same observations.
    full_dir = tmp_path / "full"
    collect(
        target, corpus, str(full_dir), fmt="full", store_dtype="float32", steps=2, progress=False
    )
    compact_dir = tmp_path / "compact"
    collect(target, corpus, str(compact_dir), fmt="compact", steps=2, progress=False)
    for path in (full_dir, compact_dir):
        other_store = DistributionStore(path)
        other_store.attach(target)
        idx = [other_store.prompts.index(p) for p in store.prompts]
        assert np.abs(other_store.observations(idx, None, subset) - got).max() <= 1e-4


def test_subset_refused_for_a_defended_target(target, tmp_path):
    from logit2prompt.defenses.chain import parse_defense
    from logit2prompt.targets.defended import DefendedTarget

    defended = DefendedTarget(target, parse_defense("topk:5"))
    corpus = Corpus([PromptRecord(p) for p in PROMPTS], source="test")
    with pytest.raises(TargetError, match="defense"):
        collect(defended, corpus, str(tmp_path / "s"), fmt="subset", progress=False)


def test_inverter_trained_on_a_subset_reads_vectors_and_observations(target, tmp_path):
    from logit2prompt.attacks.invert import invert_store
    from logit2prompt.errors import CheckpointError
    from logit2prompt.models.inverter import Inverter
    from logit2prompt.training.trainer import Trainer

    from .conftest import FIXTURE_PROMPTS, tiny_train_config

    prompts = FIXTURE_PROMPTS[:8]
    corpus = Corpus([PromptRecord(p) for p in prompts], source="fixture")
    full_dir, subset_dir = tmp_path / "full", tmp_path / "subset"
    collect(
        target, corpus, str(full_dir), fmt="full", store_dtype="float32", steps=1, progress=False
    )
    collect(
        target, corpus, str(subset_dir), fmt="subset", subset_size=52, subset_seed=3, progress=False
    )
    tok = target.tokenizer.name_or_path
    out = tmp_path / "inv"
    Trainer(
        tiny_train_config(full_dir, out, tok, max_steps=300, subset_size=52, subset_seed=3)
    ).run()
    model = Inverter.from_pretrained(out)
    subset = model.token_subset
    assert subset is not None and subset.size == 52 and model.config.input_width == 52
    assert subset == DistributionStore(subset_dir).subset  # same seed, same tokens
    full, observed = DistributionStore(full_dir), DistributionStore(subset_dir)
    from_full = invert_store(model, full, steps=1, progress=False)
    assert from_full == full.prompts  # memorised
    # The same inverter on subset observations (what an API gives) and on raw arrays.
    assert invert_store(model, observed, steps=1, progress=False) == observed.prompts
    obs = observed.coordinates(range(len(observed)))
    assert model.invert(obs + 1.5) == observed.prompts  # observations are centred again
    with pytest.raises(VectorError, match=r"\[batch, steps, 52\] \(its subset\)"):
        model.invert(np.zeros((1, 1, 40), dtype=np.float32))
    # Another subset, or whole vectors, is refused by name.
    other_dir = tmp_path / "other"
    collect(
        target, corpus, str(other_dir), fmt="subset", subset_size=52, subset_seed=4, progress=False
    )
    with pytest.raises(StoreError, match="observes 52 tokens"):
        invert_store(model, DistributionStore(other_dir), steps=1, progress=False)
    with pytest.raises(StoreError, match="--subset-size 40"):
        Trainer(tiny_train_config(subset_dir, tmp_path / "x", tok, subset_size=40))
    with pytest.raises(CheckpointError, match="whole vectors"):
        Trainer(tiny_train_config(full_dir, tmp_path / "y", tok, init_from=str(out)))
    # Trained on the subset store itself: the same tokens, no flag needed.
    again = Trainer(tiny_train_config(subset_dir, tmp_path / "z", tok, max_steps=2)).run()
    assert again.token_subset == subset
    # A retrieval inverter on the subset finds neighbours as it reads them (centred subset
    # observations), also when the search hands it whole vectors.
    from logit2prompt.attacks.nearest import MemoryNeighbours, nearest_neighbours

    retrieval = Trainer(
        tiny_train_config(
            full_dir,
            tmp_path / "nn-subset",
            tok,
            max_steps=2,
            neighbours=1,
            subset_size=52,
            subset_seed=3,
        )
    ).run()
    whole = full.vectors(range(len(full)))
    found = nearest_neighbours(MemoryNeighbours(retrieval), whole, 1)
    own = retrieval.memory.search(retrieval.as_batch(whole)[:, : retrieval.config.dim], 1)
    assert found == own == [[i] for i in range(len(full))]

    # A LoRA prefix-lm on the subset has a slim form: its basis (52 rows, not the decoder's
    # vocabulary) is stored, not rebuilt from the output layer (lstsq raised on the rows).
    plm = Trainer(
        tiny_train_config(
            subset_dir,
            tmp_path / "plm",
            tok,
            max_steps=2,
            preset="prefix-lm",
            output_tokenizer=None,
            lora_rank=4,
            overrides={"max_length": 24, "prefix_length": 4, "embed_hidden": 64},
        )
    ).run()
    plm.save_pretrained(tmp_path / "plm-slim", slim=True, dtype="bfloat16")
    slim = Inverter.from_pretrained(tmp_path / "plm-slim")
    assert torch.equal(slim.basis, plm.basis)  # buffers keep float32 under a bf16 export
    assert slim.invert(obs) == plm.invert(obs)
