"""The neighbour memory and the retrieval-augmented inverter."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from logit2prompt.data.store import DistributionStore
from logit2prompt.errors import CheckpointError, VectorError
from logit2prompt.models.inverter import Inverter
from logit2prompt.models.retrieval import MEMORY_WEIGHTS, NeighbourMemory
from logit2prompt.models.t5_inverter import CopyHead
from logit2prompt.training.trainer import Trainer

from .conftest import FIXTURE_PROMPTS, tiny_train_config
from .test_inverter import _store, killed_after_first_checkpoint

DIM = 3000


def _clusters(n_centres=20, per=5, seed=0):
    """Vectors in tight clusters far apart; prompt text names the cluster and the member."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (n_centres, DIM)).astype(np.float32)
    vectors = np.concatenate([c + rng.normal(0, 0.1, (per, DIM)) for c in centres])
    prompts = [f"cluster {c} member {m}" for c in range(n_centres) for m in range(per)]
    return prompts, vectors.astype(np.float32)


def test_sketch_keeps_l2_distances_approximately():
    rng = np.random.default_rng(1)
    x = rng.normal(-20, 3, (40, DIM)).astype(np.float32)
    memory = NeighbourMemory.build([str(i) for i in range(40)], [x], DIM, dims=512)
    true = torch.cdist(torch.from_numpy(x), torch.from_numpy(x))
    sketched = torch.cdist(memory.keys, memory.keys)
    off = ~torch.eye(40, dtype=torch.bool)
    ratio = sketched[off] / true[off]
    assert abs(float(ratio.mean()) - 1) < 0.05 and float(ratio.std()) < 0.1


def test_search_finds_the_cluster_and_excludes_itself_and_copies():
    prompts, vectors = _clusters()
    prompts[1] = prompts[0]  # a duplicate text inside cluster 0
    memory = NeighbourMemory.build(prompts, [vectors[:50], vectors[50:]], DIM, dims=256)
    queries = torch.from_numpy(vectors[::5] + 0.05)
    found = memory.search(queries, k=3)
    for c, row in enumerate(found):
        assert {i // 5 for i in row} == {c}  # all three from the query's own cluster
        assert row[0] == c * 5  # nearest is the member the query perturbs
    rows = memory.search_sketches(memory.keys, 4, exclude=list(range(len(prompts))))
    for i, row in enumerate(rows):
        assert i not in row and all(prompts[j] != prompts[i] for j in row)
        own_cluster = [j for j in row if j // 5 == i // 5]
        # The other members of its cluster, less the copy of its own text for items 0 and 1.
        assert len(own_cluster) == (3 if i in (0, 1) else 4)


def test_memory_round_trip_and_corruption(tmp_path):
    prompts, vectors = _clusters(4, 3)
    memory = NeighbourMemory.build(prompts, [vectors], DIM, dims=128, seed=7)
    memory.save(tmp_path)
    again = NeighbourMemory.load(tmp_path)
    q = torch.from_numpy(vectors + 0.01)
    assert again.search(q, 2) == memory.search(q, 2)
    assert again.prompts == prompts
    with pytest.raises(VectorError, match="entries"):
        again.search(torch.zeros(1, DIM + 1), 1)
    (tmp_path / MEMORY_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="neighbour memory"):
        NeighbourMemory.load(tmp_path)


@pytest.fixture(scope="module")
def store16(tiny_lm_dir, tmp_path_factory):
    from logit2prompt.targets import load_target

    target = load_target(str(tiny_lm_dir), mode="raw")
    return _store(target, tmp_path_factory.mktemp("store") / "s", FIXTURE_PROMPTS[:16])


@pytest.mark.parametrize("copy", [True, False], ids=["pointer", "encoder-only"])
def test_retrieval_inverter_trains_saves_and_reloads(store16, tiny_lm_dir, tmp_path, copy):
    out = tmp_path / "model"
    trainer = Trainer(
        tiny_train_config(store16, out, tiny_lm_dir, max_steps=1, neighbours=2, neighbour_copy=copy)
    )
    assert isinstance(trainer.model.t5.lm_head, CopyHead) == copy
    trainer.fit_feature_stats()
    trainer.build_memory()
    # Training neighbours never include the example itself.
    assert all(i not in row and len(row) == 2 for i, row in enumerate(trainer.neighbour_rows))
    inputs = trainer._batch_tensors(np.arange(8), "cpu")
    assert len(inputs) == 3 and inputs[2].shape[:2] == (8, 2)
    vectors, labels = inputs[:2]
    with torch.no_grad():
        before = (trainer.model(*inputs) / (labels != -100).sum()).item()
    cfg = tiny_train_config(
        store16, out, tiny_lm_dir, max_steps=80, neighbours=2, neighbour_copy=copy
    )
    model = Trainer(cfg).run()
    with torch.no_grad():
        after = (model(*inputs) / (labels != -100).sum()).item()
    assert after < before / 3

    loaded = Inverter.from_pretrained(out)
    assert loaded.memory is not None
    assert loaded.memory.prompts == DistributionStore(store16).prompts
    assert loaded.invert(vectors) == model.invert(vectors)
    # A row reads the same alone as in its batch (neighbours packed, not padded to the
    # batch's longest: T5's relative positions counted that padding).
    with torch.no_grad():
        together = loaded.label_logprobs(vectors, labels, inputs[2])
        for i in range(4):
            alone = loaded.label_logprobs(
                vectors[i : i + 1], labels[i : i + 1], inputs[2][i : i + 1]
            )
            real = labels[i] != -100
            assert torch.allclose(alone[0][real], together[i][real], atol=1e-4), i
    with torch.no_grad():
        # The encoder really reads the neighbours: other neighbours change the loss.
        shuffled = loaded.neighbour_ids([[(i + 5) % 16, (i + 9) % 16] for i in range(8)])
        assert loaded(vectors, labels, shuffled).item() != pytest.approx(
            loaded(vectors, labels, inputs[2]).item()
        )

    # A model without a memory saved over this folder does not pick up the old memory.
    if not copy:
        plain = Trainer(tiny_train_config(store16, tmp_path / "plain", tiny_lm_dir, max_steps=1))
        reused = tmp_path / "reused"
        shutil.copytree(out, reused)
        plain.run().save_pretrained(reused)
        assert Inverter.from_pretrained(reused).memory is None
        assert not (reused / MEMORY_WEIGHTS).exists()

    # A memory from another vocabulary is refused at load, not at the first inversion.
    prompts = loaded.memory.prompts
    foreign = NeighbourMemory.build(prompts, [np.zeros((len(prompts), 7), np.float32)], 7, 4)
    foreign.save(out)
    with pytest.raises(CheckpointError, match="7 entries"):
        Inverter.from_pretrained(out)
    (out / MEMORY_WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="neighbour memory"):
        Inverter.from_pretrained(out)


def test_fine_tuning_on_defended_vectors_rebuilds_the_memory(store16, tiny_lm_dir, tmp_path):
    """An adaptive attacker (defend-sweep) fine-tunes a retrieval-augmented checkpoint: its
    memory must then hold the defended vectors it will be queried with."""
    base = tmp_path / "base"
    Trainer(tiny_train_config(store16, base, tiny_lm_dir, max_steps=5, neighbours=1)).run()
    tuned = Trainer(
        tiny_train_config(
            store16,
            tmp_path / "tuned",
            tiny_lm_dir,
            max_steps=5,
            init_from=str(base),
            defense="topk:3",
        )
    ).run()
    clean = Inverter.from_pretrained(base).memory
    assert tuned.config.neighbours == 1 and tuned.memory.prompts == clean.prompts
    assert not torch.allclose(tuned.memory.keys, clean.keys)
    again = Inverter.from_pretrained(tmp_path / "tuned")
    assert torch.allclose(again.memory.keys, tuned.memory.keys, rtol=2e-3, atol=0.1)  # fp16
    assert "topk:3" in again.fingerprint.defense


def test_copy_head_loss_is_the_distribution_generation_samples_from(store16, tiny_lm_dir, tmp_path):
    """The training loss (label probabilities only) and the full distribution `generate` uses
    are the same pointer-generator mixture; forcing the gate to copy puts all mass on
    neighbour tokens."""
    trainer = Trainer(tiny_train_config(store16, tmp_path, tiny_lm_dir, neighbours=2))
    trainer.fit_feature_stats()
    trainer.build_memory()
    model = trainer.model.eval()
    vectors, labels, nb = trainer._batch_tensors(np.arange(6), "cpu")
    head = model.t5.lm_head
    with torch.no_grad():
        torch.nn.init.normal_(head.gate.weight, std=0.5)  # a gate that varies by position
        loss = model(vectors, labels, nb).item()
        encoded, decoded, copy_ids = model.teacher_forced(vectors, labels, nb)
        head.context = (encoded, copy_ids)
        lp = head(decoded)
        assert torch.allclose(lp.logsumexp(-1), torch.zeros(lp.shape[:2]), atol=1e-4)
        keep = labels != -100
        nll = -lp.gather(2, labels.clamp(min=0)[..., None])[..., 0][keep].sum().item()
        assert nll == pytest.approx(loss, rel=1e-4)
        head.gate.bias.fill_(-50.0)
        head.gate.weight.zero_()
        copied = head(decoded).exp()
        ids = set(copy_ids[copy_ids >= 0].tolist())
        outside = [t for t in range(copied.shape[-1]) if t not in ids]
        assert float(copied[..., outside].sum(-1).max()) < 1e-6
        head.context = None


def test_neighbour_length_reads_only_each_neighbours_first_tokens(store16, tiny_lm_dir, tmp_path):
    """`--set neighbour_length=N`: every neighbour is cut to its first N tokens, in training
    batches, in the bucketing lengths, after reloading and on resume."""

    def trainer(out, **overrides):
        cfg = tiny_train_config(
            store16,
            tmp_path / out,
            tiny_lm_dir,
            max_steps=2,
            neighbours=2,
            overrides={"max_length": 24, **overrides},
        )
        t = Trainer(cfg)
        t.fit_feature_stats()
        t.build_memory()
        return t

    full, cut = trainer("full"), trainer("cut", neighbour_length=3)
    rows = np.arange(8)
    wide, narrow = full._batch_tensors(rows, "cpu")[2], cut._batch_tensors(rows, "cpu")[2]
    assert wide.shape == (8, 2, 24) and narrow.shape == (8, 2, 3)
    assert torch.equal(narrow, wide[..., :3])
    assert (wide[..., 3:] >= 0).any()  # the cut really drops tokens these prompts have
    # Bucketing counts what the decoder reads: the labels plus at most 3 tokens per neighbour.
    labels = np.array([len(ids) for ids in cut.labels])
    assert (cut._example_lengths() <= labels + 2 * 3).all()
    assert (cut._example_lengths() < full._example_lengths()).any()

    def run_cfg(out):
        return tiny_train_config(
            store16,
            tmp_path / out,
            tiny_lm_dir,
            max_steps=4,
            save_every=2,
            neighbours=2,
            overrides={"max_length": 24, "neighbour_length": 3},
        )

    model = Trainer(run_cfg("trained")).run()
    loaded = Inverter.from_pretrained(tmp_path / "trained")
    assert loaded.config.neighbour_length == 3
    assert loaded.neighbour_ids([[0, 1]]).shape == (1, 2, 3)
    # A killed run resumes to the uninterrupted weights; another cut is refused by name.
    killed_after_first_checkpoint(Trainer(run_cfg("killed")))
    other = run_cfg("killed")
    other.overrides = {**other.overrides, "neighbour_length": 5}
    with pytest.raises(CheckpointError, match="overrides"):
        Trainer(other).run(resume=True)
    resumed = Trainer(run_cfg("killed")).run(resume=True)
    for (name, p), q in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name
