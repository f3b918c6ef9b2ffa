"""The two inverter architectures on their shared base: configs, dispatch, checkpoints
(including version 1, which stored one config class with both architectures' fields)."""

import json
from dataclasses import fields

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from logit2prompt.errors import CheckpointError
from logit2prompt.models import (
    Inverter,
    InverterConfig,
    PrefixLMConfig,
    PrefixLMInverter,
    T5Inverter,
    T5InverterConfig,
)
from logit2prompt.models.checkpoint import CONFIG_NAME
from logit2prompt.models.inverter import encode_labels, pad_labels

VOCAB = 40


def test_presets_give_each_architecture_its_own_config():
    t5 = InverterConfig.preset("tiny", vocab_size=VOCAB, t5_init=None, neighbour_copy=True)
    assert isinstance(t5, T5InverterConfig) and t5.neighbour_copy and t5.d_model == 32
    lm = InverterConfig.preset("prefix-lm", vocab_size=VOCAB, t5_init=None, neighbour_copy=False)
    assert isinstance(lm, PrefixLMConfig) and lm.decoder == "causal" and lm.embed_hidden == 2048
    assert not hasattr(lm, "d_model")
    with pytest.raises(ValueError, match="d_model.*another architecture"):
        InverterConfig.preset("prefix-lm", vocab_size=VOCAB, d_model=64)
    with pytest.raises(ValueError, match="prefix_length"):
        InverterConfig.preset("small", vocab_size=VOCAB, prefix_length=4)
    with pytest.raises(ValueError, match="unknown inverter preset"):
        InverterConfig.preset("huge", vocab_size=VOCAB)


def test_from_dict_reads_either_architecture_and_refuses_unknown_fields():
    union = {f.name for c in (T5InverterConfig, PrefixLMConfig) for f in fields(c)}
    old = {**T5InverterConfig(vocab_size=VOCAB).to_dict(), **PrefixLMConfig(VOCAB).to_dict()}
    assert set(old) == union
    # A version-1 prefix-lm config carried the T5 sizes too: they are dropped.
    assert isinstance(InverterConfig.from_dict({**old, "decoder": "causal"}), PrefixLMConfig)
    assert isinstance(InverterConfig.from_dict({**old, "decoder": "t5"}), T5InverterConfig)
    with pytest.raises(CheckpointError, match="unknown fields"):
        InverterConfig.from_dict({**old, "decoder": "t5", "frobnicate": 1})
    with pytest.raises(CheckpointError, match="unknown decoder"):
        InverterConfig.from_dict({"vocab_size": VOCAB, "decoder": "rnn"})


def _t5(tokenizer) -> Inverter:
    config = InverterConfig.preset("tiny", vocab_size=VOCAB)
    torch.manual_seed(0)
    return Inverter.from_config(config, tokenizer)


def _prefix_lm(tokenizer, lm_dir) -> Inverter:
    config = PrefixLMConfig(
        vocab_size=VOCAB, subspace_dim=4, decoder_init=str(lm_dir), embed_hidden=16, prefix_length=2
    )
    torch.manual_seed(0)
    model = Inverter.from_config(config, tokenizer)
    model.set_feature_stats(torch.zeros(4), torch.ones(4), torch.randn(VOCAB, 4))
    return model


def _as_version_1(directory) -> None:
    """Rewrite a checkpoint's config as logit2prompt 0.1 wrote it: every field of both."""
    path = directory / CONFIG_NAME
    saved = json.loads(path.read_text())
    union = {**T5InverterConfig(vocab_size=VOCAB).to_dict(), **PrefixLMConfig(VOCAB).to_dict()}
    path.write_text(json.dumps({**union, **saved, "version": 1}))


@pytest.mark.parametrize("arch", ["t5", "prefix-lm"])
def test_version_1_checkpoints_load_and_give_the_same_outputs(arch, tiny_lm_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = _t5(tokenizer) if arch == "t5" else _prefix_lm(tokenizer, tiny_lm_dir)
    cls = T5Inverter if arch == "t5" else PrefixLMInverter
    assert type(model) is cls
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())["version"] == 2
    _as_version_1(tmp_path / "ckpt")
    loaded = Inverter.from_pretrained(tmp_path / "ckpt")
    assert type(loaded) is cls and loaded.config == model.config
    x = torch.randn(3, VOCAB).log_softmax(-1)
    labels = pad_labels(encode_labels(tokenizer, ["a b", "c", "d e f"], 8))
    with torch.no_grad():
        assert torch.allclose(loaded(x, labels), model.eval()(x, labels))
    other = PrefixLMInverter if arch == "t5" else T5Inverter
    with pytest.raises(CheckpointError, match=f"not a {other.__name__}"):
        other.from_pretrained(tmp_path / "ckpt")


def test_future_checkpoint_versions_are_refused(tiny_lm_dir, tmp_path):
    model = _t5(AutoTokenizer.from_pretrained(tiny_lm_dir))
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": 9}))
    with pytest.raises(CheckpointError, match="version 9"):
        Inverter.from_pretrained(tmp_path / "ckpt")


def test_subspace_fit_in_column_chunks_is_the_whole_fit(monkeypatch):
    """fit_subspace sums over column chunks: any chunk width gives the same basis, and it
    spans (and reconstructs) softmax log-probs of a rank-5 model."""
    from logit2prompt.models import prefix_lm

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 5)) @ rng.normal(size=(5, 300))
    logprobs = (logits - np.log(np.exp(logits).sum(1, keepdims=True))).astype(np.float32)
    fits = []
    for chunk in (7, 4096):
        monkeypatch.setattr(prefix_lm, "FIT_CHUNK", chunk)
        fits.append(prefix_lm.fit_subspace(logprobs.copy(), 1))
    (basis, mean, std, sing), (basis2, mean2, std2, sing2) = fits
    assert basis.shape == (300, 5)  # the rank, read from the spectrum
    sign = np.sign((basis * basis2).sum(0))  # each direction is defined up to its sign
    basis2, mean2 = basis2 * sign, mean2 * sign
    for a, b in ((basis, basis2), (mean, mean2), (std, std2), (sing, sing2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    centred = logprobs - logprobs.mean(1, keepdims=True)
    np.testing.assert_allclose(centred @ basis @ basis.T, centred, atol=1e-4)
    # A read-only array (a memmap, say) is fitted on a copy and left as it was.
    frozen = logprobs.copy()
    frozen.flags.writeable = False
    np.testing.assert_allclose(prefix_lm.fit_subspace(frozen, 1)[3], sing, rtol=1e-4, atol=1e-5)
    assert np.array_equal(frozen, logprobs)


def _tiny_prefix_lm(tiny_lm_dir, **kw) -> PrefixLMConfig:
    """A LoRA prefix-lm on the tiny decoder, over a VOCAB-token target."""
    base = dict(vocab_size=VOCAB, subspace_dim=4, embed_hidden=16, prefix_length=2, lora_rank=4)
    return PrefixLMConfig(decoder_init=str(tiny_lm_dir), **{**base, **kw})


@pytest.mark.parametrize("checkpointing", [False, True])
def test_detached_neighbours_change_gradients_not_outputs(tiny_lm_dir, checkpointing):
    """`detach_neighbours`: the neighbours' keys and values come from a no-grad pass, so the
    loss is the whole context's, the prefix MLP's gradients too (nothing before the prefix
    depends on it), while the adapters no longer learn from the neighbours' positions. A
    gradient-checkpointed decoder replays its layers on the same read-only cache."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)

    def model(detach: bool) -> PrefixLMInverter:
        config = _tiny_prefix_lm(tiny_lm_dir, neighbours=2, detach_neighbours=detach)
        torch.manual_seed(0)
        m = Inverter.from_config(config, tokenizer)
        m.set_feature_stats(torch.zeros(4), torch.ones(4), torch.randn(VOCAB, 4))
        with torch.no_grad():  # adapters that matter: peft starts B at zero
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        return m

    full, detached = model(False), model(True)
    detached.load_state_dict(full.state_dict())
    if checkpointing:
        detached.lm.gradient_checkpointing_enable({"use_reentrant": False})
    assert not detached.neighbour_rank.requires_grad and full.neighbour_rank.requires_grad
    torch.manual_seed(1)
    x = torch.randn(3, VOCAB).log_softmax(-1)
    labels = pad_labels(encode_labels(tokenizer, ["a b", "c", "d e f"], 8))
    ids = torch.randint(3, VOCAB, (3, 2, 5))
    ids[0, 1, 3:] = ids[2, :, 2:] = -1  # neighbours of different lengths: left padding
    losses = []
    for m in (full, detached):
        m.train()
        loss = m(x, labels, ids)
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    grads = {n: p.grad for n, p in full.named_parameters() if p.grad is not None}
    other = {n: p.grad for n, p in detached.named_parameters() if p.grad is not None}
    assert set(other) == set(grads) - {"neighbour_rank"}
    for name in [n for n in grads if n.startswith("embed.")]:
        assert torch.allclose(grads[name], other[name], rtol=1e-4, atol=1e-5), name
    lora = [n for n in other if "lora_" in n]
    assert lora and any(not torch.allclose(grads[n], other[n], rtol=1e-2) for n in lora)
    if checkpointing:  # the replayed layers give the plain detached pass's gradients
        plain = model(True)
        plain.load_state_dict(full.state_dict())
        plain.train()
        plain(x, labels, ids).backward()
        for n, p in plain.named_parameters():
            if p.grad is not None:
                assert torch.allclose(p.grad, other[n], rtol=1e-4, atol=1e-5), n


def test_bf16_decoding_casts_weights_once_and_puts_the_flags_back(tiny_lm_dir):
    """`invert(bf16=True)` lets autocast cache each frozen weight's bf16 copy for the whole
    decode (frozen weights are marked as needing grad for its duration only): the same
    tokens as autocast casting at every op, every parameter's flag as before, and no grad."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    config = _tiny_prefix_lm(tiny_lm_dir, max_length=6)
    torch.manual_seed(0)
    m = Inverter.from_config(config, tokenizer)
    m.set_feature_stats(torch.zeros(4), torch.ones(4), torch.randn(VOCAB, 4))
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    assert not all(flags.values()) and any(flags.values())  # frozen decoder, trained adapters
    x = torch.randn(3, VOCAB).log_softmax(-1)
    cached = m.invert(x, bf16=True)
    m.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        uncached = tokenizer.batch_decode(
            m.generate_ids(m.as_batch(x, None)), skip_special_tokens=True
        )
    assert cached == [t.strip() for t in uncached]
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert all(p.grad is None for p in m.parameters())
