"""The prefix-lm's own sampling loop (`sample_ids`) against transformers' `generate`."""

import pytest
import torch
from transformers import AutoTokenizer
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from logit2prompt.errors import CheckpointError
from logit2prompt.models import Inverter
from logit2prompt.models.prefix_lm import merged_adapters, nucleus

from .test_models import VOCAB, _tiny_prefix_lm


def _model(tiny_lm_dir, **kw):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    torch.manual_seed(0)
    m = Inverter.from_config(_tiny_prefix_lm(tiny_lm_dir, **kw), tokenizer)
    m.set_feature_stats(torch.zeros(4), torch.ones(4), torch.randn(VOCAB, 4))
    with torch.no_grad():  # adapters that matter: peft starts B at zero
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return m.eval()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.7, 50, 0.95), (1.3, 5, 0.5), (1.0, 3, 1.0)],
)
def test_nucleus_keeps_what_transformers_warpers_keep(temperature, top_k, top_p):
    """The tokens left to draw and their probabilities are those of transformers' temperature,
    top-k and top-p warpers, applied in generate's order."""
    torch.manual_seed(0)
    logits = torch.randn(6, 200) * 3
    probs, index = nucleus(logits, temperature, top_k, top_p)
    scores = logits / temperature
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    expected = scores.softmax(-1)
    ours = torch.zeros_like(expected).scatter(-1, index, probs / probs.sum(-1, keepdim=True))
    assert torch.allclose(ours, expected, atol=1e-6)
    assert ((expected > 0).sum(-1) < 200).all() or (top_k == 0 and top_p == 1)


def test_merged_adapters_give_the_same_outputs_and_put_the_weights_back(tiny_lm_dir):
    """Folded adapters compute what the adapters do (in float32, and under bf16 autocast after
    it has cached casts of the unfolded weights), and leave every weight and flag as it was."""
    m = _model(tiny_lm_dir)
    before = {n: p.detach().clone() for n, p in m.lm.named_parameters()}
    flags = {n: p.requires_grad for n, p in m.lm.named_parameters()}
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        plain = m.lm(input_ids=ids).logits
        with merged_adapters(m.lm):
            merged = m.lm(input_ids=ids).logits
            assert not all(torch.equal(p, before[n]) for n, p in m.lm.named_parameters())
        with m._bf16_autocast():  # caches each frozen weight's cast
            bf16 = m.lm(input_ids=ids).logits.float()
            with merged_adapters(m.lm):
                merged_bf16 = m.lm(input_ids=ids).logits.float()
            again = m.lm(input_ids=ids).logits.float()
    assert torch.allclose(plain, merged, atol=1e-5)
    # As close as bf16 gets without folding (a stale cached cast is off by the adapters).
    rounding = (bf16 - plain).abs().max()
    assert rounding > 1e-3 and (merged_bf16 - plain).abs().max() < 2 * rounding
    assert torch.equal(again, bf16)
    assert all(torch.equal(p, before[n]) for n, p in m.lm.named_parameters())
    assert {n: p.requires_grad for n, p in m.lm.named_parameters()} == flags


def test_sampling_only_the_likeliest_token_is_greedy_decoding(tiny_lm_dir):
    """With top_k 1 every sample is the greedy decode of its row, token for token: the context
    read once and its cache repeated per sample, left-padded neighbours, the positions and
    mask of later steps, and rows that leave the batch when they end (here at different
    steps) give what `generate` gives."""
    m = _model(tiny_lm_dir, neighbours=2, max_length=8)
    torch.manual_seed(1)
    x = m.as_batch(torch.randn(4, VOCAB).log_softmax(-1), None)
    ids = torch.randint(3, VOCAB, (4, 2, 5))
    ids[0, 1, 3:] = ids[2, :, 2:] = -1  # neighbours of different lengths: left padding
    # End sequences with a token the greedy decodes produce, so that rows end at different steps.
    eos = int(torch.mode(m.generate_ids(x, ids).flatten()).values)
    m.config.eos_token_id = m.lm.generation_config.eos_token_id = eos
    greedy = m.generate_ids(x, ids)
    ends = [int((row == eos).nonzero()[0]) if (row == eos).any() else None for row in greedy]
    assert len(set(ends)) > 2, ends  # the batch shrinks more than once
    sampled = m.sample_ids(x, ids, num_return_sequences=3, top_k=1)
    assert torch.equal(sampled, greedy.repeat_interleave(3, 0))


@pytest.mark.parametrize("bad", [{"temperature": 0.0}, {"top_p": 0.0}, {"top_k": -1}])
def test_sampling_refuses_settings_without_a_distribution(tiny_lm_dir, bad):
    m = _model(tiny_lm_dir)
    with pytest.raises(ValueError, match="sampling needs"):
        m.sample_ids(torch.randn(2, VOCAB).log_softmax(-1), **bad)


def test_given_neighbours_read_like_the_memorys_nearest(tiny_lm_dir):
    """`invert(neighbours=...)`: prompts given per row are read exactly as the memory's nearest
    are (the same texts give the same decodes, greedy and seeded samples), other texts change
    the decode, and rows that cannot be read are refused by name."""
    from logit2prompt.models.retrieval import NeighbourMemory

    m = _model(tiny_lm_dir, neighbours=2, max_length=8)
    torch.manual_seed(2)
    x = torch.randn(6, VOCAB).log_softmax(-1)
    memorised = [f"memory prompt number {i} says {'x ' * i}" for i in range(6)]
    m.set_memory(NeighbourMemory.build(memorised, [x.numpy() + 0.01], VOCAB, dims=64))
    near = m.memory.search(m.as_batch(x, None)[:, : m.config.dim], 2)
    texts = [[memorised[j] for j in row] for row in near]
    assert m.invert(x, neighbours=texts) == m.invert(x)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        drawn = m.invert(x, neighbours=texts, num_return_sequences=3, do_sample=True)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        assert drawn == m.invert(x, num_return_sequences=3, do_sample=True)
    others = [[f"an unrelated request about topic {i}"] * 2 for i in range(6)]
    assert m.invert(x, neighbours=others) != m.invert(x)
    with pytest.raises(ValueError, match="5 neighbour rows for 6"):
        m.invert(x, neighbours=texts[:5])
    with pytest.raises(ValueError, match="none of them blank"):
        m.invert(x, neighbours=[[" "], *texts[1:]])
    plain = _model(tiny_lm_dir)
    with pytest.raises(CheckpointError, match="reads no neighbours"):
        plain.invert(x, neighbours=texts)
