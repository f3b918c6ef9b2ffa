"""The inverter: overfits a tiny store, checkpoints, resumes exactly, refuses bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from logit2prompt.attacks.invert import invert_store
from logit2prompt.data.collect import collect
from logit2prompt.data.corpus import Corpus, PromptRecord
from logit2prompt.data.store import DistributionStore
from logit2prompt.errors import CheckpointError, VectorError
from logit2prompt.models.inverter import Inverter, encode_labels, pad_labels
from logit2prompt.targets import load_target
from logit2prompt.training.trainer import TrainConfig, Trainer, is_trained, latest_checkpoint

from .conftest import FIXTURE_PROMPTS, accelerate_launch, tiny_train_config

MEMORISE = FIXTURE_PROMPTS[:8]


def _store(target, path, prompts, steps=1):
    corpus = Corpus([PromptRecord(p) for p in prompts], "fixture")
    collect(
        target, corpus, str(path), steps=steps, shard_size=8, store_dtype="float32", progress=False
    )
    return path


@pytest.fixture(scope="module")
def raw_target(tiny_lm_dir):
    return load_target(str(tiny_lm_dir), mode="raw")


@pytest.fixture(scope="module")
def tiny_store(raw_target, tmp_path_factory):
    return _store(raw_target, tmp_path_factory.mktemp("store") / "s", MEMORISE)


def _cfg(store, out, tokenizer_dir, **kw) -> TrainConfig:
    return tiny_train_config(store, out, tokenizer_dir, **kw)


def _tiny_prefix_lm() -> dict:
    """TrainConfig fields of a tiny prefix-lm on the tiny target's own tokenizer (fresh dicts)."""
    return dict(
        preset="prefix-lm",
        output_tokenizer=None,
        decoder_lr=3e-3,
        overrides={"max_length": 24, "prefix_length": 4, "embed_hidden": 64},
    )


def killed_after_first_checkpoint(trainer: Trainer) -> None:
    """Run `trainer` as a job killed right after writing its first checkpoint."""

    class Killed(Exception):
        pass

    real_save = trainer.save_checkpoint

    def save_then_die():
        real_save()
        raise Killed

    trainer.save_checkpoint = save_then_die
    with pytest.raises(Killed):
        trainer.run()


@pytest.fixture(scope="module")
def trained(tiny_store, tiny_lm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("inv") / "model"
    trainer = Trainer(
        _cfg(tiny_store, out, tiny_lm_dir, max_steps=300, val_data=str(tiny_store), eval_every=300)
    )
    trainer.run()
    return out, trainer.history


def test_overfits_and_reconstructs_memorised_prompts(trained, tiny_store):
    out, history = trained
    model = Inverter.from_pretrained(out)
    store = DistributionStore(tiny_store)
    assert history[-1]["val_loss"] < 0.05
    predictions = invert_store(model, store)
    assert predictions == store.prompts
    # Decoding under bf16 autocast keeps what was memorised (the margins are wide).
    assert invert_store(model, store, bf16=True, progress=False) == store.prompts


def test_training_loss_falls_by_a_large_factor(tiny_store, tiny_lm_dir, tmp_path):
    trainer = Trainer(_cfg(tiny_store, tmp_path / "m", tiny_lm_dir, max_steps=1))
    trainer.fit_feature_stats()
    vectors, labels = trainer._batch_tensors(np.arange(8), "cpu")
    with torch.no_grad():
        before = (trainer.model(vectors, labels) / (labels != -100).sum()).item()
    model = Trainer(_cfg(tiny_store, tmp_path / "m2", tiny_lm_dir, max_steps=150)).run()
    with torch.no_grad():
        after = (model(vectors, labels) / (labels != -100).sum()).item()
    assert after < before / 20


def test_trainers_with_different_precisions_in_one_process(tiny_store, tiny_lm_dir, tmp_path):
    """Accelerate keeps one mixed-precision setting per process; a second Trainer asking for
    another (a notebook, or the quickstart after another run) must still train."""
    for i, (precision, accum) in enumerate((("no", 1), ("bf16", 2), ("no", 1))):
        cfg = _cfg(
            tiny_store,
            tmp_path / str(i),
            tiny_lm_dir,
            max_steps=2,
            mixed_precision=precision,
            grad_accum=accum,
        )
        trainer = Trainer(cfg)
        assert trainer.accelerator.mixed_precision == precision
        trainer.run()
        assert is_trained(tmp_path / str(i))


def test_save_load_round_trip_is_identical(trained, tiny_store, tmp_path):
    out, _ = trained
    a = Inverter.from_pretrained(out)
    a.save_pretrained(tmp_path / "copy")
    b = Inverter.from_pretrained(tmp_path / "copy")
    x = torch.from_numpy(DistributionStore(tiny_store).vectors(range(4)))
    assert a.invert(x, num_beams=3) == b.invert(x, num_beams=3)
    labels = torch.tensor([[5, 6, 7, a.config.eos_token_id]] * 4)
    with torch.no_grad():
        assert torch.equal(a(x[:, 0], labels), b(x[:, 0], labels))
    assert a.fingerprint == b.fingerprint
    assert json.loads((out / "training_args.json").read_text())["preset"] == "tiny"


def test_beams_and_sampling_return_several(trained, tiny_store):
    model = Inverter.from_pretrained(trained[0])
    x = DistributionStore(tiny_store).vectors(range(2))
    beams = model.invert(x, num_beams=4, num_return_sequences=3)
    assert len(beams) == 2 and all(len(b) == 3 for b in beams)
    sampled = model.invert(x, do_sample=True, num_return_sequences=2, temperature=1.5)
    assert len(sampled) == 2 and all(len(s) == 2 for s in sampled)
    greedy = model.invert(x)
    assert model.invert(x, grouped=True) == [[g] for g in greedy]
    seen = {}
    real = model.generate_ids

    def spy(vectors, neighbour_ids=None, **kwargs):
        seen.update(kwargs)
        ids = real(vectors, neighbour_ids, **kwargs)
        eos = model.config.eos_token_id
        for row in ids.tolist():
            row = row[: row.index(eos) + 1] if eos in row else row  # drop the padding after EOS
            pairs = list(zip(row, row[1:], strict=False))
            assert len(pairs) == len(set(pairs))  # no token bigram repeats
        return ids

    model.generate_ids = spy
    assert len(model.invert(x, no_repeat_ngram_size=2)) == 2
    assert seen["no_repeat_ngram_size"] == 2
    model.generate_ids = real
    single = model.invert(x[0, 0])  # one bare [vocab] vector
    assert isinstance(single, list) and len(single) == 1


def test_schedule_counts_and_non_finite_gradients_stop_training(tiny_store, tiny_lm_dir, tmp_path):
    from logit2prompt.training.trainer import check_schedule

    for bad in ("save_every", "eval_every", "log_every", "grad_accum", "keep_checkpoints"):
        with pytest.raises(CheckpointError, match=f"--{bad.replace('_', '-')} 0: must be"):
            check_schedule(_cfg(tiny_store, tmp_path, tiny_lm_dir, **{bad: 0}))
    trainer = Trainer(_cfg(tiny_store, tmp_path / "nan", tiny_lm_dir, save_every=5))
    real = trainer.model.forward
    calls = []

    def poisoned(*args, **kwargs):  # a finite loss for 5 steps, then NaN
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) > 5 else loss

    trainer.model.forward = poisoned
    with pytest.raises(CheckpointError, match="non-finite .* step 6; nothing was updated and"):
        trainer.run()
    assert latest_checkpoint(tmp_path / "nan").name == "step-5"


def test_resume_matches_uninterrupted(tiny_store, tiny_lm_dir, tmp_path):
    straight = Trainer(_cfg(tiny_store, tmp_path / "a", tiny_lm_dir, save_every=10)).run()

    killed_after_first_checkpoint(
        Trainer(_cfg(tiny_store, tmp_path / "b", tiny_lm_dir, save_every=10))
    )
    assert (tmp_path / "b" / "checkpoints" / "step-10").is_dir()
    # Another recipe is refused before it touches the checkpoint, naming the difference.
    other = Trainer(_cfg(tiny_store, tmp_path / "b", tiny_lm_dir, save_every=10, lr=3e-4))
    with pytest.raises(CheckpointError, match=r"lr 0\.003 there, 0\.0003 here"):
        other.run(resume=True)
    # --lora-rank means nothing to a T5 inverter: not a difference.
    lora_only = _cfg(tiny_store, tmp_path / "b", tiny_lm_dir, save_every=10, lora_rank=0)
    t5 = Trainer(lora_only)
    t5.ensure_same_recipe(
        tmp_path / "b" / "checkpoints" / "step-10",
        json.loads((tmp_path / "b" / "checkpoints" / "step-10" / "trainer_state.json").read_text()),
    )
    bigger = _cfg(tiny_store, tmp_path / "b", tiny_lm_dir, save_every=10, grad_accum=2)
    with pytest.raises(CheckpointError, match="global batch"):
        Trainer(bigger).run(resume=True)
    # The same global batch split otherwise orders the data otherwise: refused too.
    split = dict(save_every=10, grad_accum=2, per_device_batch_size=4)
    with pytest.raises(CheckpointError, match="micro batch 8 there, 4 here"):
        Trainer(_cfg(tiny_store, tmp_path / "b", tiny_lm_dir, **split)).run(resume=True)
    # A save a kill interrupted (step-N.tmp, trainer state already written) is not resumed.
    half = tmp_path / "b" / "checkpoints" / "step-15.tmp"
    shutil.copytree(tmp_path / "b" / "checkpoints" / "step-10", half)
    assert latest_checkpoint(tmp_path / "b").name == "step-10"
    shutil.rmtree(half)
    # A truncated checkpoint is a CheckpointError naming it, not a raw traceback.
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    weights = tmp_path / "c" / "checkpoints" / "step-10" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot resume from .*step-10"):
        Trainer(_cfg(tiny_store, tmp_path / "c", tiny_lm_dir, save_every=10)).run(resume=True)
    assert (tmp_path / "b" / "checkpoints" / "step-10").is_dir()
    resumed_trainer = Trainer(_cfg(tiny_store, tmp_path / "b", tiny_lm_dir, save_every=10))
    resumed = resumed_trainer.run(resume=True)
    assert resumed_trainer.step == 20
    for (name, p), q in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.allclose(p, q, atol=1e-6), name


def test_a_final_save_killed_midway_is_not_a_finished_run(
    tiny_store, tiny_lm_dir, tmp_path, monkeypatch
):
    """The TRAINING_COMPLETE marker goes before the final model is rewritten: a run killed
    while writing it must not pass for finished (quickstart would skip training)."""
    cfg = _cfg(tiny_store, tmp_path, tiny_lm_dir, max_steps=2)
    Trainer(cfg).run()
    assert is_trained(tmp_path)

    class Killed(Exception):
        pass

    real_save = Inverter.save_pretrained

    def killed_while_writing_the_final_model(self, directory, **kwargs):
        if Path(directory) != tmp_path:  # the last checkpoint, written first, is whole
            return real_save(self, directory, **kwargs)
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise Killed

    monkeypatch.setattr(Inverter, "save_pretrained", killed_while_writing_the_final_model)
    with pytest.raises(Killed):
        Trainer(_cfg(tiny_store, tmp_path, tiny_lm_dir, max_steps=3)).run()
    assert not is_trained(tmp_path)


def test_checkpoints_keep_the_fp16_loss_scale(tiny_store, tiny_lm_dir, tmp_path):
    """fp16's loss scaler has learnt its scale by the time of a checkpoint: a resume starts
    from it, not from 65536 again (a few skipped, overflowing steps per resume)."""
    cfg = _cfg(tiny_store, tmp_path, tiny_lm_dir, save_every=10)
    saver = Trainer(cfg)
    saver.prepare(False)
    # fp16 needs a GPU; the checkpoint code sees only the Accelerator's scaler.
    saver.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    saver.accelerator.scaler.scale(torch.ones(1))  # the scale exists from the first step
    saver.accelerator.scaler.update(new_scale=2.0**7)
    path = saver.save_checkpoint()
    loader = Trainer(cfg)
    loader.prepare(False)
    loader.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    loader.load_checkpoint(path)
    assert loader.accelerator.scaler.get_scale() == 2.0**7


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset", ["tiny", "prefix-lm", "prefix-lm-neighbours", "prefix-lm-detached-neighbours"]
)
def test_accelerate_two_processes_match_one(tiny_store, tiny_lm_dir, tmp_path, preset):
    from safetensors.torch import load_file

    # prefix-lm: the decoder is the store's own (tiny) target, found from its fingerprint.
    model_args = (
        ["--output-tokenizer", str(tiny_lm_dir)]
        if preset == "tiny"
        else ["--decoder-lr", "0.003", "--set", "prefix_length=4", "--set", "embed_hidden=64"]
    )
    if preset == "prefix-lm-neighbours":  # each neighbour cut to its first 3 tokens
        model_args += ["--neighbours", "2", "--set", "neighbour_length=3"]
    if preset == "prefix-lm-detached-neighbours":  # neighbours read without gradients
        model_args += ["--neighbours", "2", "--set", "detach_neighbours=true"]
    common = [
        "--data",
        str(tiny_store),
        "--preset",
        preset.removesuffix("-neighbours").removesuffix("-detached"),
        *model_args,
        "--max-steps",
        "8",
        "--lr",
        "0.003",
        "--warmup-steps",
        "0",
        "--schedule",
        "constant",
        "--mixed-precision",
        "no",
        "--no-progress",
        "--set",
        "max_length=24",
    ]
    one = [
        sys.executable,
        "-m",
        "logit2prompt.cli.main",
        "train",
        "--out",
        str(tmp_path / "one"),
        "--per-device-batch-size",
        "8",
        *common,
    ]
    two = accelerate_launch(
        "logit2prompt.cli.main",
        "train",
        "--out",
        str(tmp_path / "two"),
        "--per-device-batch-size",
        "4",
        *common,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [one, two]
    if preset == "tiny":
        # Two processes killed after step 4 and resumed end where the uninterrupted one does:
        # the main process writes both processes' RNG states, and each reads its own back.
        first_half = [a if a != "8" else "4" for a in two]  # --max-steps 8 -> 4
        runs = [one, [*first_half, "--save-every", "4"], [*two, "--save-every", "4", "--resume"]]
    for cmd in runs:
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    if preset == "tiny":
        # The schedule rebuilt for the new length is said once, by the main process.
        assert result.stderr.count("resuming with --max-steps 8 where the run planned 4") == 1
        saved = tmp_path / "two" / "checkpoints" / "step-8"
        assert {p.name for p in saved.glob("rng_state_*.pt")} == {
            "rng_state_0.pt",
            "rng_state_1.pt",
        }
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), k


def test_refuses_foreign_corrupted_and_mismatched(trained, tiny_store, tiny_lm_dir, tmp_path):
    out, _ = trained
    with pytest.raises(CheckpointError, match="not a logit2prompt inverter checkpoint"):
        Inverter.from_pretrained(tiny_lm_dir)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="missing or corrupted"):
        Inverter.from_pretrained(broken)
    (broken / "inverter_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="corrupted"):
        Inverter.from_pretrained(broken)
    odd = tmp_path / "odd"
    shutil.copytree(out, odd)
    (odd / "fingerprint.json").write_text(json.dumps({"name": "x"}))  # a foreign fingerprint
    with pytest.raises(CheckpointError, match="fingerprint.json is corrupted or foreign"):
        Inverter.from_pretrained(odd)

    model = Inverter.from_pretrained(out)
    user = load_target(str(tiny_lm_dir), mode="user")
    x = user.next_token_logprobs(["hi there"])
    with pytest.raises(VectorError, match=r"mode.*user.*raw|mode.*raw.*user"):
        model.invert(x, fingerprint=user.fingerprint)
    other_store = _store(user, tmp_path / "user_store", MEMORISE[:2])
    with pytest.raises(VectorError, match="trained on"):
        invert_store(model, DistributionStore(other_store))


def test_refuses_bad_vectors(trained):
    model = Inverter.from_pretrained(trained[0])
    vocab = model.config.vocab_size
    with pytest.raises(VectorError, match=f"{vocab}"):
        model.invert(np.zeros((2, vocab + 3), dtype=np.float32))
    bad = np.zeros((2, vocab), dtype=np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(VectorError, match="vector 1 contains NaN"):
        model.invert(bad)
    bad[1, 3] = np.inf
    with pytest.raises(VectorError, match="NaN or inf"):
        model.invert(bad)
    bad[1, 3] = 1e39  # finite in float64, inf as the float32 the inverter reads
    with pytest.raises(VectorError, match="vector 1 contains NaN or inf"):
        model.invert(bad.astype(np.float64))
    with pytest.raises(VectorError, match="empty batch"):
        model.invert(np.zeros((0, vocab), dtype=np.float32))
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        model.invert(np.zeros((1, vocab), dtype=np.float32), batch_size=0)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    model.train()  # a decode that fails leaves the model in the mode it found
    model.generate_ids = out_of_memory
    with pytest.raises(RuntimeError, match="out of memory"):
        model.invert(np.zeros((1, vocab), dtype=np.float32))
    assert model.training


def test_multi_step_inverter_trains(raw_target, tiny_lm_dir, tmp_path):
    store = _store(raw_target, tmp_path / "s3", MEMORISE[:8], steps=3)
    model = Trainer(_cfg(store, tmp_path / "m", tiny_lm_dir, max_steps=5)).run()
    assert model.config.steps == 3 and model.config.dim == 3 * raw_target.vocab_size
    x = DistributionStore(store).vectors(range(2))
    assert len(model.invert(x)) == 2
    with pytest.raises(VectorError, match="3 steps asked for but the vectors hold 1"):
        model.invert(x[:, 0])


@pytest.mark.parametrize("tied", [True, False])
def test_pretrained_t5_init_round_trips(tiny_store, tiny_lm_dir, tmp_path, tied):
    from transformers import T5Config, T5ForConditionalGeneration

    # A stand-in for t5-small/t5-base (tied: decoder outputs scaled by d_model**-0.5) or for
    # t5-v1.1/flan-t5 (untied in their configs: not scaled), with other sizes than the preset.
    pre = T5Config(
        vocab_size=100,
        d_model=24,
        d_ff=40,
        d_kv=6,
        num_heads=4,
        num_layers=1,
        num_decoder_layers=1,
        feed_forward_proj="relu",
        tie_word_embeddings=tied,
    )
    torch.manual_seed(3)
    T5ForConditionalGeneration(pre).save_pretrained(tmp_path / "t5")
    model = Trainer(
        _cfg(tiny_store, tmp_path / "m", tiny_lm_dir, max_steps=3, t5_init=str(tmp_path / "t5"))
    ).run()
    assert model.config.d_model == 24 and model.config.feed_forward_proj == "relu"
    model.eval()  # the pretrained config has dropout
    loaded = Inverter.from_pretrained(tmp_path / "m")
    x = torch.from_numpy(DistributionStore(tiny_store).vectors(range(3)))
    labels = torch.tensor([[5, 6, loaded.config.eos_token_id]] * 3)
    with torch.no_grad():
        assert torch.equal(model(x[:, 0], labels), loaded(x[:, 0], labels))


def test_invert_cli_every_source(trained, tiny_store, tiny_lm_dir, tmp_path, capsys):
    from logit2prompt.attacks.invert import save_vectors
    from logit2prompt.cli.main import main

    out, _ = trained
    store = DistributionStore(tiny_store)
    preds = tmp_path / "preds.jsonl"
    assert (
        main(["invert", "--checkpoint", str(out), "--data", str(tiny_store), "--out", str(preds)])
        == 0
    )
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["hidden"] for r in rows] == store.prompts
    assert all(r["exact"] == 1.0 and r["recovered"] == r["hidden"] for r in rows)

    assert main(["invert", "--checkpoint", str(out), "--text", MEMORISE[2]]) == 0
    assert repr(MEMORISE[2]) in capsys.readouterr().out
    # An empty or over-long --text stops with the reason instead of inverting something else.
    assert main(["invert", "--checkpoint", str(out), "--text", "  "]) == 2
    assert "--text is empty" in capsys.readouterr().err
    # Corpus flags with another source were ignored (the whole store inverted): refused.
    flags = ["--limit", "2", "--split", "test", "--basis-from", "x"]
    assert main(["invert", "--checkpoint", str(out), "--text", MEMORISE[2], *flags]) == 2
    err = capsys.readouterr().err
    assert "--limit applies to --prompts only; --split applies" in err
    assert "--basis-from applies to --data only" in err
    long = ["invert", "--checkpoint", str(out), "--text", "word " * 70]
    assert main(long) == 2
    assert "over --max-tokens 64" in capsys.readouterr().err
    assert main([*long, "--max-tokens", "200"]) == 0
    assert "'word word" in capsys.readouterr().out

    corpus = tmp_path / "p.txt"
    corpus.write_text("\n".join([*MEMORISE[:3], "word " * 200]))  # the last one is over-long
    assert (
        main(
            [
                "invert",
                "--checkpoint",
                str(out),
                "--prompts",
                str(corpus),
                "--out",
                str(tmp_path / "p.jsonl"),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "wrote 3 predictions" in captured.out and "exact 100.0%" in captured.out
    assert "skipped 1 prompts" in captured.err and "too_long" in captured.err

    np.save(tmp_path / "v.npy", store.vectors([1, 2])[:, 0])
    assert main(["invert", "--checkpoint", str(out), "--vectors", str(tmp_path / "v.npy")]) == 0
    assert repr(store.prompts[1]) in capsys.readouterr().out

    user = load_target(str(tiny_lm_dir), mode="user")
    save_vectors(
        tmp_path / "u.safetensors", user.next_token_logprobs(["hi"]).numpy(), user.fingerprint
    )
    code = main(["invert", "--checkpoint", str(out), "--vectors", str(tmp_path / "u.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "come from" in err and "mode" in err


def test_invert_cli_rerank_with_a_store(trained, raw_target, tiny_lm_dir, tmp_path, capsys):
    """`--rerank-with STORE` adds the store's nearest prompts to the beams and lets the target
    choose: prompts the inverter never saw come back exactly when the store holds them."""
    from logit2prompt.cli.main import main

    out, _ = trained
    unseen = FIXTURE_PROMPTS[8:11]
    extra = _store(raw_target, tmp_path / "extra", unseen)
    corpus = tmp_path / "unseen.txt"
    corpus.write_text("\n".join(unseen))
    base = ["invert", "--checkpoint", str(out), "--num-beams", "2"]
    assert main([*base, "--prompts", str(corpus), "--out", str(tmp_path / "plain.jsonl")]) == 0
    plain = [json.loads(line) for line in (tmp_path / "plain.jsonl").read_text().splitlines()]
    assert not all(r["exact"] == 1.0 for r in plain)  # the inverter alone does not know them
    for source in (["--prompts", str(corpus)], ["--data", str(extra)]):
        preds = tmp_path / "reranked.jsonl"
        args = [*base, *source, "--rerank-with", str(extra), "--out", str(preds), "--no-progress"]
        assert main(args) == 0
        rows = [json.loads(line) for line in preds.read_text().splitlines()]
        assert [r["recovered"] for r in rows] == unseen
    capsys.readouterr()
    # Greedy (one candidate from the inverter) works too.
    greedy = ["invert", "--checkpoint", str(out), "--text", unseen[1], "--rerank-with", str(extra)]
    assert main(greedy) == 0
    assert repr(unseen[1]) in capsys.readouterr().out
    assert main([*base, "--text", unseen[0], "--rerank-with", str(extra), "--sample"]) == 2
    assert "drop --sample" in capsys.readouterr().err
    user = load_target(str(tiny_lm_dir), mode="user")
    foreign = _store(user, tmp_path / "user_store", unseen[:1])
    assert main([*base, "--text", unseen[0], "--rerank-with", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "collected from" in err and "mode" in err


def test_invert_cli_fallback_to_a_store(trained, tiny_store, raw_target, tmp_path, monkeypatch):
    """`--fallback-to STORE` keeps the inverter's output where it is confident and answers
    with the store's nearest prompt elsewhere, never loading the target."""
    import logit2prompt.attacks.invert
    from logit2prompt.cli.main import main

    def no_target(*_, **__):
        raise AssertionError("--fallback-to must not query the target")

    monkeypatch.setattr(logit2prompt.attacks.invert, "target_for", no_target)
    out, _ = trained
    unseen = FIXTURE_PROMPTS[8:11]
    extra = _store(raw_target, tmp_path / "extra", unseen)

    def recovered(data, *flags) -> list[str]:
        preds = tmp_path / "preds.jsonl"
        args = ["invert", "--checkpoint", str(out), "--data", str(data), "--no-progress"]
        assert main([*args, *flags, "--out", str(preds)]) == 0
        return [json.loads(line)["recovered"] for line in preds.read_text().splitlines()]

    own = recovered(extra)
    assert own != unseen  # the inverter alone does not know these prompts
    fallback = ["--fallback-to", str(extra)]
    # Never confident: every answer is the store's nearest prompt (here the prompt itself).
    assert recovered(extra, *fallback, "--confidence-nats", "-1") == unseen
    assert recovered(extra, *fallback, "--confidence-nats", "1e9") == own
    # The memorised prompts are written with near-zero NLL: the default keeps them.
    assert recovered(tiny_store, *fallback) == MEMORISE
    both = ["--rerank-with", str(extra), *fallback]
    assert main(["invert", "--checkpoint", str(out), "--data", str(extra), *both]) == 2
    sampled = [*fallback, "--sample"]
    assert main(["invert", "--checkpoint", str(out), "--data", str(extra), *sampled]) == 2
    alone = ["--confidence-nats", "3"]
    assert main(["invert", "--checkpoint", str(out), "--data", str(extra), *alone]) == 2


def test_invert_cli_mbr(trained, tiny_store, tmp_path, capsys, monkeypatch):
    """`--mbr-samples N` answers with the consensus of the inverter's samples: on prompts it has
    memorised, the samples agree with the greedy output, which is the prompt. It never loads
    the target, and clashing choices are refused."""
    import logit2prompt.attacks.invert
    from logit2prompt.cli.main import main

    def no_target(*_, **__):
        raise AssertionError("--mbr-samples must not query the target")

    monkeypatch.setattr(logit2prompt.attacks.invert, "target_for", no_target)
    out, _ = trained
    preds = tmp_path / "mbr.jsonl"
    args = ["invert", "--checkpoint", str(out), "--data", str(tiny_store), "--no-progress"]
    assert main([*args, "--mbr-samples", "4", "--out", str(preds)]) == 0
    assert [json.loads(x)["recovered"] for x in preds.read_text().splitlines()] == MEMORISE
    capsys.readouterr()
    assert main([*args, "--mbr-samples", "4", "--num-beams", "2"]) == 2
    assert "drop --num-beams" in capsys.readouterr().err
    assert main([*args, "--mbr-samples", "4", "--no-repeat-ngram-size", "3"]) == 2
    assert "drop --no-repeat-ngram-size" in capsys.readouterr().err
    assert main([*args, "--mbr-samples", "1"]) == 2
    assert "at least 2 samples" in capsys.readouterr().err


def test_info_summarises_stores_and_checkpoints(trained, tiny_store, capsys):
    from logit2prompt.cli.main import main

    assert main(["info", str(tiny_store)]) == 0
    assert json.loads(capsys.readouterr().out)["num_prompts"] == len(MEMORISE)
    assert main(["info", str(trained[0])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["format"] == "logit2prompt-inverter"
    assert info["training"]["max_steps"] == 300 and "history" not in info["training"]
    assert info["last_validation"]["step"] == 300
    assert info["target"]["vocab_size"] == info["config"]["vocab_size"]


def test_likelihood_picks_the_memorised_prompt_among_candidates(trained, tiny_store):
    from logit2prompt.attacks.rerank import neighbour_likelihoods, pick_by_likelihood

    model = Inverter.from_pretrained(trained[0])
    store = DistributionStore(tiny_store)
    n = len(store)
    vectors = store.vectors(range(n))
    labels = pad_labels(encode_labels(model.tokenizer, store.prompts, model.config.max_length))
    with torch.no_grad():
        each = model(torch.from_numpy(vectors)[:, 0], labels, per_example=True)
        total = model(torch.from_numpy(vectors)[:, 0], labels)
    assert each.shape == (n,) and float(each.sum()) == pytest.approx(float(total), rel=1e-5)
    # Every prompt is a candidate for every vector, the true one never first.
    near = [[(i + 1 + j) % n for j in range(n)] for i in range(n)]
    rows, nll, counts = neighbour_likelihoods(model, store, vectors, near=near)
    assert nll.shape == (n, n) and rows == near
    for mean in (False, True):
        assert pick_by_likelihood(store, rows, nll, counts, mean) == store.prompts


def test_pick_by_inverter_rules():
    from logit2prompt.attacks.rerank import pick_by_inverter

    nll, tokens = np.array([2.0, 3.0, 10.0]), np.array([2, 6, 10])
    neighbour = np.array([False, True, True])
    assert pick_by_inverter(nll, tokens, neighbour, "summed") == 0
    assert pick_by_inverter(nll, tokens, neighbour, "per-token") == 1  # 1.0, 0.5, 1.0
    assert pick_by_inverter(nll, tokens, neighbour, "summed", bonus=1.5) == 1  # 2.0 vs 1.5
    assert pick_by_inverter(nll, tokens, neighbour, "summed", bonus=0.5) == 0  # 2.0 vs 2.5
    with pytest.raises(ValueError, match="rule must be one of"):
        pick_by_inverter(nll, tokens, neighbour, "mean")


def test_causal_lm_decoder_overfits_and_round_trips(tiny_store, tiny_lm_dir, tmp_path):
    """preset prefix-lm: the target's own LM (here the tiny one, found from the store's
    fingerprint) writes the prompt from a prefix made of the vector's subspace coordinates."""
    cfg = _cfg(
        tiny_store,
        tmp_path / "m",
        tiny_lm_dir,
        preset="prefix-lm",
        output_tokenizer=None,
        max_steps=200,
        decoder_lr=3e-3,
        overrides={"max_length": 24, "prefix_length": 4, "embed_hidden": 64},
    )
    trainer = Trainer(cfg)
    config = trainer.model.config
    assert config.decoder_init == str(tiny_lm_dir)
    # 8 training vectors span at most 8 directions; the fitted rank is read from the data.
    assert 1 <= config.subspace_dim <= 8
    model = trainer.run()
    store = DistributionStore(tiny_store)
    assert invert_store(model, store) == store.prompts
    loaded = Inverter.from_pretrained(tmp_path / "m")
    x = torch.from_numpy(store.vectors(range(4)))
    assert loaded.invert(x, num_beams=3) == model.invert(x, num_beams=3)
    assert [len(c) for c in loaded.invert(x, num_beams=3, num_return_sequences=2)] == [2] * 4
    labels = pad_labels(encode_labels(loaded.tokenizer, store.prompts[:4], 24))
    with torch.no_grad():
        assert torch.allclose(loaded(x[:, 0], labels), model.eval()(x[:, 0], labels))
        per_token = loaded.label_logprobs(x[:, 0], labels)
    assert per_token.shape == (*labels.shape, len(loaded.tokenizer))
    with pytest.raises(CheckpointError, match="decoder config"):
        (tmp_path / "m" / "decoder_config.json").write_text("{not json")
        Inverter.from_pretrained(tmp_path / "m")


def test_causal_lm_decoder_refuses_a_foreign_output_tokenizer(tiny_store, tiny_lm_dir, tmp_path):
    from logit2prompt.errors import StoreError

    cfg = _cfg(tiny_store, tmp_path / "m", tiny_lm_dir, preset="prefix-lm")
    with pytest.raises(StoreError, match="own tokenizer"):
        Trainer(cfg)


def test_causal_lm_decoder_learns_to_read_neighbours(tiny_store, tiny_lm_dir, tmp_path):
    """--init-from a prefix-lm with --neighbours: the same weights now also read the nearest
    training prompts (left-padded context); generation and teacher forcing agree."""
    kw = _tiny_prefix_lm()
    Trainer(_cfg(tiny_store, tmp_path / "m0", tiny_lm_dir, max_steps=20, **kw)).run()
    cfg = _cfg(
        tiny_store,
        tmp_path / "m1",
        tiny_lm_dir,
        max_steps=150,
        init_from=str(tmp_path / "m0"),
        neighbours=2,
        **kw,
    )
    trainer = Trainer(cfg)
    # A prefix-lm copies by attention: its config has no copy head to switch on.
    assert trainer.model.config.neighbours == 2
    assert not hasattr(trainer.model.config, "neighbour_copy")
    model = trainer.run().eval()
    store = DistributionStore(tiny_store)
    x = torch.from_numpy(store.vectors(range(8)))[:, 0]
    # Training reads each prompt's nearest *other* prompts (its own text is never in the
    # memory at test time); given those, it reconstructs every memorised prompt.
    near = model.neighbour_ids(trainer.neighbour_rows[:8])
    out = model.generate_ids(x, near, output_scores=True, return_dict_in_generate=True)
    ids = out.sequences
    assert model.tokenizer.batch_decode(ids, skip_special_tokens=True) == store.prompts
    # Neighbours of different lengths pad the context on the left: the positions generate
    # derives from the mask must be the ones training used, or the scores disagree.
    eos = ids == model.config.eos_token_id
    labels = ids.masked_fill((eos.cumsum(1) - eos.long()) > 0, -100)  # all after the first EOS
    real = labels != -100
    scores = torch.log_softmax(torch.stack(out.scores, 1).float(), -1)
    forced = model.label_logprobs(x, labels, near)
    assert torch.allclose(forced[real], scores[real], atol=1e-4)
    assert (near[:, :, 0] >= 0).all() and len(set((near >= 0).sum(-1).flatten().tolist())) > 1
    loaded = Inverter.from_pretrained(tmp_path / "m1")
    assert loaded.memory is not None and loaded.config.neighbours == 2
    assert loaded.invert(x, num_beams=3) == model.invert(x, num_beams=3)
    # Scoring candidates without the target (rerank.candidate_likelihoods) matches teacher
    # forcing one candidate at a time: ragged rows, length-sorted batches, the memory's
    # neighbours looked up once per row.
    from logit2prompt.attacks.rerank import candidate_likelihoods

    obs = store.vectors(range(3))
    p = store.prompts
    cands = [[p[0], p[5]], [p[1]], [p[4], p[2], p[2][:-3]]]
    nll, tokens = candidate_likelihoods(loaded, obs, cands, batch_size=2, progress=False)
    flat = torch.from_numpy(obs)[:, 0]
    near = loaded.find_neighbours(flat)
    for i, row in enumerate(cands):
        assert len(nll[i]) == len(tokens[i]) == len(row)
        for j, c in enumerate(row):
            labels = pad_labels(encode_labels(loaded.tokenizer, [c], loaded.config.max_length))
            with torch.no_grad():
                one = loaded(flat[i : i + 1], labels, near[i : i + 1], per_example=True)
            assert nll[i][j] == pytest.approx(float(one[0]), rel=1e-4, abs=1e-4)
            assert tokens[i][j] == int((labels != -100).sum())


def _lengths_trainer(store, out, tokenizer_dir, **kw) -> Trainer:
    return Trainer(_cfg(store, out, tokenizer_dir, per_device_batch_size=2, **kw))


def test_length_bucketing_keeps_epochs_whole_and_batches_homogeneous(
    tiny_store, tiny_lm_dir, tmp_path
):
    """bucket_lengths: every epoch still visits each example once, in batches of consecutive
    lengths (no two batches' length ranges interleave), and the order is a pure function of
    the step (two trainers agree; a later epoch differs)."""
    trainer = _lengths_trainer(tiny_store, tmp_path / "a", tiny_lm_dir)
    again = _lengths_trainer(tiny_store, tmp_path / "b", tiny_lm_dir)
    plain = _lengths_trainer(tiny_store, tmp_path / "c", tiny_lm_dir, bucket_lengths=False)
    lengths = trainer._example_lengths()
    per_epoch = trainer.micro_per_epoch
    assert per_epoch == 4 and len(set(lengths.tolist())) > 2
    epochs = []
    for epoch in range(2):
        batches = [trainer._global_batch(epoch * per_epoch + j) for j in range(per_epoch)]
        assert sorted(np.concatenate(batches).tolist()) == sorted(trainer.train_idx.tolist())
        spans = sorted((lengths[b].min(), lengths[b].max()) for b in batches)
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:], strict=False))
        again_batches = [again._global_batch(epoch * per_epoch + j) for j in range(per_epoch)]
        assert all((a == b).all() for a, b in zip(batches, again_batches, strict=True))
        epochs.append(np.concatenate(batches).tolist())
    assert epochs[0] != epochs[1]
    # Without bucketing the same examples come in the seeded permutation's order.
    unsorted = np.concatenate([plain._global_batch(j) for j in range(per_epoch)])
    assert sorted(unsorted.tolist()) == sorted(epochs[0])


@pytest.mark.parametrize("detached", [False, True])
def test_lora_decoder_trains_adapters_only_resumes_and_round_trips(
    tiny_store, tiny_lm_dir, tmp_path, detached
):
    """lora_rank: the decoder's own weights stay exactly as loaded and get no optimizer
    state; the adapters and the prefix MLP learn; a killed run resumes to the uninterrupted
    result (training time carried over); the checkpoint loads without peft's help. Also with
    2 neighbours read without gradients under gradient checkpointing (detach_neighbours)."""
    from safetensors.torch import load_file

    kw = dict(
        preset="prefix-lm",
        output_tokenizer=None,
        lora_rank=4,
        max_steps=20,
        save_every=10,
        overrides={"max_length": 24, "prefix_length": 4, "embed_hidden": 64},
    )
    if detached:
        kw["neighbours"] = 2
        kw["gradient_checkpointing"] = True
        kw["overrides"] = {**kw["overrides"], "detach_neighbours": True}
    straight_trainer = Trainer(_cfg(tiny_store, tmp_path / "a", tiny_lm_dir, **kw))
    model = straight_trainer.model
    base = {n: p.detach().clone() for n, p in model.lm.named_parameters() if "lora_" not in n}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("lm.") is ("lora_" in n) for n in trainable)
    straight = straight_trainer.run()
    for n, p in straight.lm.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n
    assert any(p.abs().sum() > 0 for n, p in straight.lm.named_parameters() if "lora_B" in n), (
        "the adapters never moved off their zero start"
    )
    state = straight_trainer.optimizer.state
    assert len(state) == len(trainable)

    killed_after_first_checkpoint(Trainer(_cfg(tiny_store, tmp_path / "b", tiny_lm_dir, **kw)))
    saved = json.loads(
        (tmp_path / "b" / "checkpoints" / "step-10" / "trainer_state.json").read_text()
    )
    assert saved["train_seconds"] > 0
    with pytest.raises(CheckpointError, match="lora_rank 4 there, 8 here"):
        Trainer(_cfg(tiny_store, tmp_path / "b", tiny_lm_dir, **{**kw, "lora_rank": 8})).run(
            resume=True
        )
    # A checkpoint from before these fields existed recorded neither: it trained every decoder
    # weight on unsorted batches, and resuming it with today's defaults is refused by name.
    args_file = tmp_path / "b" / "checkpoints" / "step-10" / "training_args.json"
    recorded = json.loads(args_file.read_text())
    legacy = {k: v for k, v in recorded.items() if k not in ("lora_rank", "bucket_lengths")}
    args_file.write_text(json.dumps(legacy))
    with pytest.raises(CheckpointError, match="lora_rank 0 there, 4 here.*bucket_lengths False"):
        Trainer(_cfg(tiny_store, tmp_path / "b", tiny_lm_dir, **kw)).run(resume=True)
    args_file.write_text(json.dumps(recorded))
    resumed_trainer = Trainer(_cfg(tiny_store, tmp_path / "b", tiny_lm_dir, **kw))
    resumed = resumed_trainer.run(resume=True)
    assert resumed_trainer.train_seconds > saved["train_seconds"]
    for (name, p), q in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.allclose(p, q, atol=1e-6), name
    weights = load_file(tmp_path / "a" / "model.safetensors")
    assert any("lora_A" in k for k in weights)
    loaded = Inverter.from_pretrained(tmp_path / "a")
    assert loaded.config.lora_rank == 4
    store = DistributionStore(tiny_store)
    x = torch.from_numpy(store.vectors(range(4)))
    assert loaded.invert(x, num_beams=2) == straight.invert(x, num_beams=2)


def test_max_minutes_counts_training_steps_only(tiny_store, tiny_lm_dir, tmp_path):
    """A spent time budget stops the run after the step that spent it; the validation
    history records the training minutes, not the wall clock."""
    cfg = _cfg(tiny_store, tmp_path / "m", tiny_lm_dir, max_minutes=0.0, val_data=str(tiny_store))
    trainer = Trainer(cfg)
    trainer.run()
    assert trainer.step == 1 and is_trained(tmp_path / "m")
    (entry,) = trainer.history
    assert 0 < entry["train_minutes"] * 60 <= trainer.train_seconds + 1e-9


def test_long_prompts_grow_a_new_inverters_max_length(raw_target, tiny_lm_dir, tmp_path, caplog):
    """A store of prompts past 64 tokens trains a new inverter that writes them whole (its
    max_length grows and is saved); a fixed max_length cuts them with a warning."""
    long = " ".join(MEMORISE)
    prompts = [long, MEMORISE[0]]
    store = _store(raw_target, tmp_path / "long", prompts)

    def run(out: str, **kw) -> TrainConfig:
        return _cfg(store, tmp_path / out, tiny_lm_dir, per_device_batch_size=2, **kw)

    trainer = Trainer(run("grown", max_steps=2, overrides={}))
    ids = trainer.model.tokenizer(prompts, add_special_tokens=False)["input_ids"]
    assert len(ids[0]) > 64
    assert trainer.model.config.max_length == len(ids[0]) + 1
    assert trainer.labels[0][:-1] == ids[0]  # whole, then EOS
    trainer.run()
    assert Inverter.from_pretrained(tmp_path / "grown").config.max_length == len(ids[0]) + 1
    caplog.clear()
    fixed = Trainer(run("fixed", max_steps=2, overrides={"max_length": 24}))
    assert fixed.model.config.max_length == 24 and len(fixed.labels[0]) == 24
    assert "1 of 2 prompts" in caplog.text and "are cut" in caplog.text
    # A checkpoint keeps its max_length unless --set changes it; nothing else may change.
    tune = dict(max_steps=1, init_from=str(tmp_path / "fixed"))
    fixed.run()
    kept = Trainer(run("t1", **tune, overrides={}))
    assert kept.model.config.max_length == 24
    whole = len(ids[0]) + 1
    grown = Trainer(run("t2", **tune, overrides={"max_length": whole}))
    assert grown.model.config.max_length == whole and grown.labels[0][:-1] == ids[0]
    with pytest.raises(CheckpointError, match="--set d_model cannot change a checkpoint"):
        Trainer(run("t3", **tune, overrides={"d_model": 64}))


@pytest.mark.parametrize("preset", ["tiny", "prefix-lm"])
def test_gradient_checkpointing_trains_the_same_weights(preset, tiny_store, tiny_lm_dir, tmp_path):
    """Recomputing activations in the backward pass changes memory, not the result."""
    kw: dict = {"max_steps": 6}
    if preset == "prefix-lm":
        kw.update(
            preset="prefix-lm",
            output_tokenizer=None,
            lora_rank=4,
            overrides={"max_length": 24, "prefix_length": 4, "embed_hidden": 64},
        )
    plain = Trainer(_cfg(tiny_store, tmp_path / "a", tiny_lm_dir, **kw)).run()
    trainer = Trainer(
        _cfg(tiny_store, tmp_path / "b", tiny_lm_dir, gradient_checkpointing=True, **kw)
    )
    decoder = trainer.model.lm if trainer.model.causal else trainer.model.t5
    new_name = hasattr(type(decoder), "is_activation_checkpointing")  # transformers >= 5.2x
    assert getattr(
        decoder, "is_activation_checkpointing" if new_name else "is_gradient_checkpointing"
    )
    checkpointed = trainer.run()
    ours, theirs = plain.state_dict(), checkpointed.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in ours)


def test_slim_checkpoint_rebuilds_the_decoder_and_basis(tiny_store, tiny_lm_dir, tmp_path, capsys):
    """A slim LoRA prefix-lm stores only what training changed; loading rebuilds the frozen
    decoder from decoder_init (checked by hash) and the basis from the output layer, and
    predicts exactly as the full checkpoint. Other recipes and changed decoders are refused."""
    import shutil

    from safetensors.torch import load_file, save_file

    lm_copy = tmp_path / "lm"
    shutil.copytree(tiny_lm_dir, lm_copy)
    kw = dict(
        preset="prefix-lm",
        output_tokenizer=None,
        decoder_init=str(lm_copy),
        lora_rank=4,
        max_steps=10,
        overrides={"max_length": 24, "prefix_length": 4, "embed_hidden": 64},
    )
    model = Trainer(_cfg(tiny_store, tmp_path / "full", tiny_lm_dir, **kw)).run()
    model.save_pretrained(tmp_path / "slim", slim=True)
    full_size = (tmp_path / "full" / "model.safetensors").stat().st_size
    slim_weights = load_file(tmp_path / "slim" / "model.safetensors")
    assert (tmp_path / "slim" / "model.safetensors").stat().st_size < full_size / 2
    assert not any(k.startswith("lm.") and "lora_" not in k for k in slim_weights)
    assert "basis" not in slim_weights and "basis_coefficients" in slim_weights
    derived = json.loads((tmp_path / "slim" / "derived.json").read_text())
    assert derived["basis"]["error"] < 1e-4

    from logit2prompt.cli.main import main

    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "full"),
                "--out",
                str(tmp_path / "cli"),
                "--verify-data",
                str(tiny_store),
                "--verify-limit",
                "4",
            ]
        )
        == 0
    )
    assert "identical to the original on 4 of 4" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "inverter_config.json").read_text())["decoder_init"] == (
        str(lm_copy)
    )
    slim = Inverter.from_pretrained(tmp_path / "slim")
    for (name, p), q in zip(model.state_dict().items(), slim.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-5 * max(1.0, float(p.abs().max()))), name
    store = DistributionStore(tiny_store)
    x = torch.from_numpy(store.vectors(range(6)))
    assert slim.invert(x, num_beams=2) == model.invert(x, num_beams=2)

    model.save_pretrained(tmp_path / "half", slim=True, dtype="float16")
    assert load_file(tmp_path / "half" / "model.safetensors")["embed.0.weight"].dtype == (
        torch.float16
    )
    # Weights take the smaller dtype; the buffers that standardise every input do not.
    assert load_file(tmp_path / "half" / "model.safetensors")["feature_mean"].dtype == (
        torch.float32
    )
    half = Inverter.from_pretrained(tmp_path / "half")
    assert torch.allclose(half.embed[0].weight, model.embed[0].weight, atol=1e-3)
    # Saving a full checkpoint over a slim one leaves no stale record behind.
    slim.save_pretrained(tmp_path / "half")
    assert not (tmp_path / "half" / "derived.json").exists()

    # A stored tensor of another shape than the config builds: a CheckpointError naming it.
    shutil.copytree(tmp_path / "slim", tmp_path / "reshaped")
    reshaped = dict(slim_weights)
    reshaped["embed.0.weight"] = reshaped["embed.0.weight"][:, :-1].contiguous()
    save_file(reshaped, str(tmp_path / "reshaped" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match="(?s)does not match its config.*size mismatch for embed.0.weight"
    ):
        Inverter.from_pretrained(tmp_path / "reshaped")

    # Another decoder at decoder_init: the hash of the rebuilt weights says so.
    weights = load_file(lm_copy / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1.0
    save_file(weights, str(lm_copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="differ from those"):
        Inverter.from_pretrained(tmp_path / "slim")
    (tmp_path / "slim" / "derived.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="derived.json is corrupted"):
        Inverter.from_pretrained(tmp_path / "slim")
    t5 = Trainer(_cfg(tiny_store, tmp_path / "t5", tiny_lm_dir, max_steps=1)).run()
    with pytest.raises(CheckpointError, match="only a prefix-lm with LoRA"):
        t5.save_pretrained(tmp_path / "t5-slim", slim=True)


def test_shipped_inverters_load_by_name(trained, tmp_path, monkeypatch):
    """`default` and a target's name resolve to the inverters shipped in the package; any
    other name that is not a directory is refused with the list of what ships."""
    import shutil

    from logit2prompt.models import pretrained

    out, _ = trained
    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", tmp_path / "pretrained")
    with pytest.raises(CheckpointError, match="shipped: none"):
        Inverter.from_pretrained("default")
    shutil.copytree(out, tmp_path / "pretrained" / "smollm2-135m-instruct")
    for name in ("default", "smollm2-135m-instruct"):
        assert Inverter.from_pretrained(name).config.to_dict() == (
            Inverter.from_pretrained(out).config.to_dict()
        )
    with pytest.raises(CheckpointError, match="shipped: default, smollm2-135m-instruct"):
        Inverter.from_pretrained("no-such-inverter")


def test_every_shipped_inverter_is_slim_carded_and_for_the_default_target():
    """Each inverter in the package stays within the versioning budget (60 MB), has a model
    card, and is fingerprinted for the embedded default target (so it resolves offline)."""
    from logit2prompt.models import pretrained
    from logit2prompt.recipes import demo
    from logit2prompt.targets import DEFAULT_TARGET

    names = pretrained.shipped()
    # Every inverter the demo runs (each mode's, and the search's further proposers) ships.
    needed = {*demo.SHIPPED.values(), *(n for ns in demo.SEARCH_WITH.values() for n in ns)}
    assert needed <= set(names) and f"{DEFAULT_TARGET}-reply" in needed
    for name in names:
        folder = pretrained.PRETRAINED_DIR / name
        size = sum(f.stat().st_size for f in folder.iterdir())
        assert size <= 60e6, (name, size)
        assert "## Intended use" in (folder / "README.md").read_text(), name
        fingerprint = json.loads((folder / "fingerprint.json").read_text())
        assert fingerprint["name"] == DEFAULT_TARGET and fingerprint["vocab_size"] == 49152, name
        assert (folder / "derived.json").is_file(), name  # slim: the decoder is the target's


@pytest.mark.embedded
def test_the_shipped_inverter_loads_offline_and_reads_its_target():
    """The inverter in the package loads by name from its slim files and the embedded target's
    weights (no network), and inverts that target's distributions."""
    from logit2prompt.attacks.invert import target_for

    model = Inverter.from_pretrained("default")
    assert model.config.decoder_init == "smollm2-135m-instruct" and model.config.lora_rank
    target = target_for(model)
    assert target.fingerprint.id == model.fingerprint.id
    x = target.next_token_logprobs(["Can you help me plan a birthday party?"], model.config.steps)
    (text,) = model.invert(x)
    assert isinstance(text, str) and text.strip()


def test_batch_defaults_to_the_presets(tiny_store, tiny_lm_dir, tmp_path):
    """per_device_batch_size 0: the preset's (4 for prefix-lm, 32 for T5 presets), recorded
    resolved so the checkpoint says what ran and a resume compares real numbers."""
    from logit2prompt.training.config import default_batch

    kw = dict(
        preset="prefix-lm",
        output_tokenizer=None,
        per_device_batch_size=0,
        max_steps=1,
        overrides={"max_length": 24, "prefix_length": 4, "embed_hidden": 64},
    )
    trainer = Trainer(_cfg(tiny_store, tmp_path / "p", tiny_lm_dir, **kw))
    assert trainer.cfg.per_device_batch_size == 4 and trainer.global_micro == 4
    trainer.run()
    recorded = json.loads((tmp_path / "p" / "training_args.json").read_text())
    assert recorded["per_device_batch_size"] == 4
    assert default_batch("small") == default_batch("tiny") == 32


def test_adapt_recipe_fine_tunes_on_a_domain_and_resumes(trained, tmp_path):
    """`logit2prompt adapt`: the prompts observed on the checkpoint's own target, then a
    fine-tune from it that changes its weights, records where it started and reruns as a
    no-op; too few prompts are refused before anything is collected."""
    from logit2prompt.cli.main import main
    from logit2prompt.errors import CorpusError
    from logit2prompt.recipes.adapt import AdaptConfig, adapt

    trained = trained[0]
    prompts = tmp_path / "domain.txt"
    prompts.write_text("\n".join(FIXTURE_PROMPTS[8:20]) + "\n")
    args = ["adapt", "--checkpoint", str(trained), "--prompts", str(prompts)]
    assert main([*args, "--out", str(tmp_path / "a"), "--max-steps", "3", "--no-progress"]) == 0
    path = tmp_path / "a" / "inverter"
    store = DistributionStore(tmp_path / "a" / "store")
    base = Inverter.from_pretrained(trained)
    assert store.fingerprint == base.fingerprint and store.prompts == FIXTURE_PROMPTS[8:20]
    tuned = Inverter.from_pretrained(path)
    assert json.loads((path / "training_args.json").read_text())["init_from"] == str(trained)
    before, after = base.state_dict(), tuned.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    cfg = AdaptConfig(
        prompts=str(prompts), out=str(tmp_path / "a"), checkpoint=str(trained), max_steps=3
    )
    cfg.progress = False
    assert adapt(cfg) == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    few = tmp_path / "few.txt"
    few.write_text("\n".join(FIXTURE_PROMPTS[:3]) + "\n")
    with pytest.raises(CorpusError, match="at least 8"):
        adapt(AdaptConfig(prompts=str(few), out=str(tmp_path / "b"), checkpoint=str(trained)))
    assert not (tmp_path / "b").exists()


def test_a_corrector_reads_the_neighbour_texts_it_is_given(tiny_store, tiny_lm_dir, tmp_path):
    """--neighbour-texts: each training prompt reads the texts given for it (here near misses
    of itself) in place of its memory's nearest; fine-tuned from a retrieval-augmented
    checkpoint, it keeps that checkpoint's memory; prompts without texts are refused."""
    from logit2prompt.errors import StoreError
    from logit2prompt.training.corrector import closest_first

    kw = _tiny_prefix_lm()
    Trainer(_cfg(tiny_store, tmp_path / "m0", tiny_lm_dir, max_steps=4, neighbours=2, **kw)).run()
    store = DistributionStore(tiny_store)
    # Near misses: each prompt less its last word, and another prompt.
    near = [
        [" ".join(p.split()[:-1]), store.prompts[(i + 1) % len(store)]]
        for i, p in enumerate(store.prompts)
    ]
    assert closest_first([near[0][1], near[0][0], store.prompts[0]], store.prompts[0], 2) == near[0]
    texts = tmp_path / "near.jsonl"
    rows = [{"prompt": p, "neighbours": n} for p, n in zip(store.prompts, near, strict=True)]
    texts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(
        tiny_store,
        tmp_path / "m1",
        tiny_lm_dir,
        max_steps=4,
        init_from=str(tmp_path / "m0"),
        neighbour_texts=str(texts),
        **kw,
    )
    trainer = Trainer(cfg)
    trainer.prepare()
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.memory.prompts == Inverter.from_pretrained(tmp_path / "m0").memory.prompts
    _, _, ids = trainer._batch_tensors(np.arange(3), "cpu")
    read = [
        [
            model.tokenizer.decode([t for t in row.tolist() if t >= 0], skip_special_tokens=True)
            for row in example
        ]
        for example in ids
    ]
    assert read == near[:3]
    Trainer(cfg).run()
    loaded = Inverter.from_pretrained(tmp_path / "m1")
    assert loaded.memory.prompts == model.memory.prompts
    assert json.loads((tmp_path / "m1" / "training_args.json").read_text())["neighbour_texts"]

    # `hypotheses` writes such a file from an inverter's own outputs, and resumes it.
    from logit2prompt.cli.main import main

    hyp = tmp_path / "hyp.jsonl"
    args = ["hypotheses", "--checkpoint", str(tmp_path / "m0"), "--data", str(tiny_store)]
    args += ["--out", str(hyp), "--samples", "2", "--batch-size", "3", "--no-progress"]
    assert main(args) == 0
    written = [json.loads(line) for line in hyp.read_text().splitlines()]
    assert [r["prompt"] for r in written] == store.prompts
    assert all(1 <= len(r["neighbours"]) <= 2 for r in written)
    assert all(r["prompt"] not in r["neighbours"] for r in written)
    # Killed after 4 whole lines and half of the fifth: the half line goes, the rest is kept.
    half = json.dumps(written[4])[:20]
    hyp.write_text("".join(json.dumps(r) + "\n" for r in written[:4]) + half)
    assert main(args) == 0
    again = [json.loads(line) for line in hyp.read_text().splitlines()]
    assert again[:4] == written[:4] and [r["prompt"] for r in again] == store.prompts

    texts.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    with pytest.raises(StoreError, match="gives no neighbours for 1 of"):
        Trainer(
            _cfg(
                tiny_store,
                tmp_path / "m2",
                tiny_lm_dir,
                max_steps=1,
                init_from=str(tmp_path / "m0"),
                neighbour_texts=str(texts),
                **kw,
            )
        ).prepare()
    with pytest.raises(StoreError, match="needs an inverter that reads neighbours"):
        Trainer(
            _cfg(
                tiny_store,
                tmp_path / "m3",
                tiny_lm_dir,
                max_steps=1,
                neighbour_texts=str(texts),
                **kw,
            )
        ).prepare()


def test_train_cli_refuses_a_fresh_run_into_an_earlier_runs_checkpoints(
    tiny_store, tmp_path, capsys
):
    from logit2prompt.cli.main import main

    old = tmp_path / "out" / "checkpoints" / "step-2000"
    old.mkdir(parents=True)
    (old / "trainer_state.json").write_text(json.dumps({"step": 2000}))
    assert main(["train", "--data", str(tiny_store), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "earlier run (latest: step-2000); --resume continues it" in err
    assert old.is_dir()  # nothing of it was touched
