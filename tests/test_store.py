"""The distribution store: round trip, random access, refusals that lose nothing."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest

from logit2prompt.data.collect import collect
from logit2prompt.data.corpus import Corpus, PromptRecord
from logit2prompt.data.store import (
    DistributionStore,
    StorePlan,
    StoreWriter,
    filter_store,
    merge_stores,
    read_manifest,
)
from logit2prompt.errors import StoreError, VectorError
from logit2prompt.targets import load_target


def _corpus(n: int) -> Corpus:
    return Corpus(
        [PromptRecord(f"prompt number {i}", {"task": f"t{i % 2}"}) for i in range(n)], "memory"
    )


@pytest.fixture(scope="module")
def raw_target(tiny_lm_dir):
    return load_target(str(tiny_lm_dir), mode="raw")


@pytest.mark.parametrize("store_dtype", ["float32", "float16"])
def test_round_trip(raw_target, tmp_path, store_dtype):
    corpus = _corpus(11)
    result = collect(
        raw_target,
        corpus,
        tmp_path / "s",
        store_dtype=store_dtype,
        shard_size=4,
        batch_size=3,
        progress=False,
    )
    assert result.shards_written == 3 and result.num_prompts == 11
    store = DistributionStore(tmp_path / "s")
    assert len(store) == 11 and store.prompts == corpus.texts
    assert store.meta[3] == {"task": "t1", "split": corpus.records[3].split}
    expected = raw_target.next_token_logprobs(corpus.texts).numpy()
    got = store.vectors(range(11))[:, 0]
    tol = 1e-5 if store_dtype == "float32" else 2e-2
    assert np.abs(got - expected).max() <= tol
    assert np.allclose(store.vector(5)[0], got[5])
    batches = list(store.batches(4, shuffle=True, seed=1))
    assert sorted(i for idx, _, _ in batches for i in idx) == list(range(11))
    idx, prompts, vecs = batches[0]
    assert prompts == [store.prompts[i] for i in idx] and np.allclose(vecs, store.vectors(idx))
    manifest = read_manifest(tmp_path / "s")
    assert manifest["complete"] and manifest["dtype"] == store_dtype
    assert manifest["fingerprint"]["id"] == raw_target.fingerprint.id


def test_steps_are_stored(raw_target, tmp_path):
    collect(raw_target, _corpus(5), tmp_path / "s", steps=3, shard_size=2, progress=False)
    store = DistributionStore(tmp_path / "s")
    assert store.vectors([0, 4]).shape == (2, 3, raw_target.vocab_size)
    assert store.dim == 3 * raw_target.vocab_size


def test_stores_collected_in_pieces_merge_into_one(raw_target, tmp_path):
    """merge: the prompts in order, the same vectors, a partial shard in the middle read
    as any other; stores that differ or overlap are refused and the sources stay as they were."""
    from logit2prompt.cli.main import main

    a, b = _corpus(5), Corpus([PromptRecord(f"another prompt {i}", {}) for i in range(6)], "m")
    collect(raw_target, a, tmp_path / "a", steps=2, shard_size=2, progress=False)
    collect(raw_target, b, tmp_path / "b", steps=2, shard_size=4, progress=False)
    assert (
        main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 0
    )
    merged = DistributionStore(tmp_path / "m")
    assert merged.prompts == a.texts + b.texts and len(merged) == 11
    expected = np.concatenate(
        [
            DistributionStore(tmp_path / "a").vectors(range(5)),
            DistributionStore(tmp_path / "b").vectors(range(6)),
        ]
    )
    # (compact stores: rebuilt by a matmul whose rounding depends on the batch)
    assert np.allclose(merged.vectors(range(11)), expected, atol=1e-5)
    assert sorted(i for idx, _, _ in merged.batches(3) for i in idx) == list(range(11))
    assert len(DistributionStore(tmp_path / "a")) == 5  # the sources are untouched
    with pytest.raises(StoreError, match="exists"):
        merge_stores(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(StoreError, match="both hold the prompt"):
        merge_stores(tmp_path / "m2", [tmp_path / "a", tmp_path / "m"])
    collect(raw_target, _corpus(3), tmp_path / "c", steps=1, progress=False)
    with pytest.raises(StoreError, match="steps"):
        merge_stores(tmp_path / "m3", [tmp_path / "b", tmp_path / "c"])
    assert not (tmp_path / "m3").exists() and not (tmp_path / "m2").exists()


def test_filter_keeps_some_sources_of_a_store(raw_target, tmp_path):
    """filter: the kept prompts in order with their own vectors, rows of other sources and
    prompts the store lacks left out, the source untouched; nothing kept or an existing out
    is refused and leaves nothing behind."""
    from logit2prompt.cli.main import main

    corpus = _corpus(7)
    collect(raw_target, corpus, tmp_path / "s", steps=2, shard_size=3, progress=False)
    rows = [
        {"prompt": p, "source": "a" if i in (1, 3, 4, 6) else "b"}
        for i, p in enumerate(corpus.texts)
    ]
    rows.append({"prompt": "never collected", "source": "a"})
    keep = tmp_path / "mix.jsonl"
    keep.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["filter", str(tmp_path / "s"), "--keep", str(keep), "--sources", "a"]
    assert main([*args, "--out", str(tmp_path / "f")]) == 0
    source, kept = DistributionStore(tmp_path / "s"), DistributionStore(tmp_path / "f")
    assert kept.prompts == [corpus.texts[i] for i in (1, 3, 4, 6)] and len(source) == 7
    assert kept.meta == [source.meta[i] for i in (1, 3, 4, 6)]
    assert np.allclose(kept.vectors(range(4)), source.vectors([1, 3, 4, 6]), atol=1e-5)
    assert sorted(i for idx, _, _ in kept.batches(3) for i in idx) == list(range(4))
    assert read_manifest(tmp_path / "f")["corpus"]["of"] == 7
    assert main([*args, "--out", str(tmp_path / "f")]) != 0  # exists
    with pytest.raises(StoreError, match="keeps none"):
        filter_store(tmp_path / "g", tmp_path / "s", lambda p: False)
    assert not (tmp_path / "g").exists()


def test_refuses_other_target_dtype_or_corpus(tiny_lm_dir, raw_target, tmp_path):
    out = tmp_path / "s"
    collect(raw_target, _corpus(6), out, shard_size=4, fmt="full", progress=False)
    before = sorted(p.name for p in (out / "shards").iterdir())
    user = load_target(str(tiny_lm_dir), mode="user")
    with pytest.raises(StoreError, match="different target.*mode"):
        collect(user, _corpus(6), out, shard_size=4, fmt="full", progress=False)
    with pytest.raises(StoreError, match="dtype"):
        collect(
            raw_target,
            _corpus(6),
            out,
            shard_size=4,
            fmt="full",
            store_dtype="float32",
            progress=False,
        )
    with pytest.raises(StoreError, match="encoding full but this run writes output-layer"):
        collect(raw_target, _corpus(6), out, shard_size=4, fmt="compact", progress=False)
    with pytest.raises(StoreError, match="different prompt list"):
        collect(raw_target, _corpus(7), out, shard_size=4, fmt="full", progress=False)
    assert sorted(p.name for p in (out / "shards").iterdir()) == before
    assert len(DistributionStore(out)) == 6


def test_nan_vector_is_refused_and_nothing_written(raw_target, tmp_path):
    plan = StorePlan(raw_target.fingerprint, "float16", 1, 4, 4, {"sha256": "x"})
    writer = StoreWriter(tmp_path / "s", plan)
    vecs = np.zeros((4, 1, raw_target.vocab_size), dtype=np.float32)
    vecs[2, 0, 7] = np.nan
    with pytest.raises(VectorError, match="prompt 2.*'c'"):
        writer.write_shard(0, vecs, ["a", "b", "c", "d"], [{}] * 4)
    vecs[2, 0, 7] = -np.inf
    with pytest.raises(VectorError, match="NaN or inf"):
        writer.write_shard(0, vecs, ["a", "b", "c", "d"], [{}] * 4)
    assert list((tmp_path / "s" / "shards").iterdir()) == []


def test_disk_full_keeps_finished_shards(raw_target, tmp_path, monkeypatch):
    import logit2prompt.data.store as store_mod

    out = tmp_path / "s"
    real_save = np.save
    calls = {"n": 0}

    def failing_save(f, arr):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(f, arr)

    monkeypatch.setattr(store_mod.np, "save", failing_save)
    with pytest.raises(StoreError, match="No space left.*rerun the same command"):
        collect(raw_target, _corpus(8), out, shard_size=4, progress=False)
    monkeypatch.setattr(store_mod.np, "save", real_save)
    files = sorted(p.name for p in (out / "shards").iterdir())
    assert files == ["000000.json", "000000.npy"]  # no temporary left behind
    with pytest.raises(StoreError, match="incomplete"):
        DistributionStore(out)
    result = collect(raw_target, _corpus(8), out, shard_size=4, progress=False)
    assert result.shards_skipped == 1 and result.shards_written == 1
    assert len(DistributionStore(out)) == 8


def test_foreign_and_corrupted_stores(tmp_path):
    with pytest.raises(StoreError, match="not a distribution store"):
        DistributionStore(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupted"):
        DistributionStore(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(StoreError, match="not a logit2prompt"):
        DistributionStore(tmp_path)


def test_corrupted_shard_is_reported(raw_target, tmp_path):
    out = tmp_path / "s"
    collect(raw_target, _corpus(4), out, shard_size=4, progress=False)
    (out / "shards" / "000000.npy").write_bytes(b"garbage")
    with pytest.raises(StoreError, match="corrupted"):
        DistributionStore(out).vector(0)


def test_shards_that_disagree_with_their_index_or_manifest(raw_target, tmp_path):
    out = tmp_path / "s"
    collect(raw_target, _corpus(6), out, shard_size=4, progress=False)
    shards = out / "shards"
    array = np.load(shards / "000000.npy")
    np.save(shards / "000000.npy", array[:3])  # one row short of its index's 4 prompts
    with pytest.raises(StoreError, match=r"expected \[4, .*lists 4 prompts"):
        DistributionStore(out).vector(0)
    np.save(shards / "000000.npy", array)
    index = json.loads((shards / "000001.json").read_text())
    index["meta"] = index["meta"][:1]
    (shards / "000001.json").write_text(json.dumps(index))
    with pytest.raises(StoreError, match="2 prompts, 1 meta"):
        DistributionStore(out)
    index["prompts"], index["meta"] = index["prompts"][:1], index["meta"][:1]
    (shards / "000001.json").write_text(json.dumps(index))
    with pytest.raises(StoreError, match="list 5 prompts, its manifest 6"):
        DistributionStore(out)


def test_atomic_open_leaves_the_old_file_or_the_new_one(tmp_path):
    from logit2prompt.cache import atomic_open

    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write("half of the new")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    with atomic_open(path) as f:
        f.write("caf\u00e9")
    assert path.read_bytes() == "caf\u00e9".encode() and list(tmp_path.iterdir()) == [path]
