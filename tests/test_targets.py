"""Targets: batched left-padded log-probs equal single-prompt passes; greedy steps; identity."""

from __future__ import annotations

import pytest
import torch

from logit2prompt.errors import TargetError
from logit2prompt.targets import HFTarget, load_target

from .conftest import FIXTURE_PROMPTS

PROMPTS = FIXTURE_PROMPTS[:6] + ["Hi", "A much longer prompt that pads every other row a lot more"]


@pytest.mark.parametrize("mode", ["raw", "user", "system"])
def test_batched_equals_one_at_a_time(tiny_lm_dir, mode):
    target = load_target(str(tiny_lm_dir), mode=mode, batch_size=8)
    batched = target.next_token_logprobs(PROMPTS)
    if mode == "user":  # every row starts with the template's system turn: one shared cache
        assert target.last_shared_prefix >= 4
    assert batched.shape == (len(PROMPTS), target.vocab_size)
    assert batched.dtype == torch.float32
    for i, p in enumerate(PROMPTS):
        ids = torch.tensor([target.encode([p])[0]])
        with torch.no_grad():
            single = torch.log_softmax(target.model(input_ids=ids).logits[0, -1], dim=-1)
        assert (batched[i] - single).abs().max().item() <= 1e-4, (mode, p)
    assert torch.allclose(batched.exp().sum(-1), torch.ones(len(PROMPTS)), atol=1e-4)


@pytest.mark.parametrize("mode", ["raw", "user"])
def test_steps_equal_teacher_forced_greedy(tiny_lm_dir, mode):
    steps = 4
    target = load_target(str(tiny_lm_dir), mode=mode, batch_size=3)
    multi = target.next_token_logprobs(PROMPTS[:5], steps=steps)
    assert multi.shape == (5, steps, target.vocab_size)
    assert torch.allclose(multi[:, 0], target.next_token_logprobs(PROMPTS[:5]), atol=1e-5)
    for i, p in enumerate(PROMPTS[:5]):
        ids = target.encode([p])[0]
        greedy = multi[i].argmax(-1).tolist()
        full = torch.tensor([ids + greedy[:-1]])
        with torch.no_grad():
            logits = target.model(input_ids=full).logits[0]
        forced = torch.log_softmax(logits[len(ids) - 1 :], dim=-1)
        assert forced.shape[0] == steps
        assert (forced - multi[i]).abs().max().item() <= 1e-4


def test_modes_render_differently_and_fingerprints_differ(tiny_lm_dir):
    raw, user, system = (load_target(str(tiny_lm_dir), mode=m) for m in ("raw", "user", "system"))
    assert raw.render("X") == "X"
    assert "<|im_start|>user\nX<|im_end|>" in user.render("X")
    assert "You are tiny." in user.render("X")  # the template's built-in system prompt
    assert "<|im_start|>system\nX<|im_end|>" in system.render("X")
    assert "Hello!" in system.render("X")
    ids = {t.fingerprint.id for t in (raw, user, system)}
    assert len(ids) == 3
    diffs = raw.fingerprint.differences(user.fingerprint)
    assert any(d.startswith("mode:") for d in diffs)
    custom = load_target(str(tiny_lm_dir), mode="user", system_prompt="Be brief.")
    assert "Be brief." in custom.render("X") and "You are tiny." not in custom.render("X")
    assert custom.fingerprint.template != user.fingerprint.template
    # A setting the mode would ignore, unrecorded, is refused before anything loads.
    for mode in ("raw", "system", "guarded"):
        with pytest.raises(TargetError, match=f"--system-prompt is user mode's.*in {mode} mode"):
            load_target("no/such/model", mode=mode, system_prompt="Be brief.")
    for mode in ("raw", "user"):
        with pytest.raises(TargetError, match=f"--user-turn is the attacker's.*in {mode} mode"):
            load_target("no/such/model", mode=mode, user_turn="Hi")


def test_fingerprint_tracks_weights_and_dtype(tiny_lm_dir, tmp_path):
    from .conftest import make_tiny_lm

    a = load_target(str(tiny_lm_dir), mode="raw")
    other = load_target(str(make_tiny_lm(tmp_path / "other", seed=1)), mode="raw")
    assert a.fingerprint.weights_sha256 != other.fingerprint.weights_sha256
    bf16 = load_target(str(tiny_lm_dir), mode="raw", dtype="bfloat16")
    assert bf16.fingerprint.dtype == "bfloat16" and bf16.fingerprint.id != a.fingerprint.id
    out = bf16.next_token_logprobs(["hello"])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # The output-layer check runs the model in fp32 once; after it, every tensor has its own
    # dtype again (RoPE's fp32 inv_freq came back bf16, moving later vectors).
    dtypes = {n: t.dtype for n, t in [*bf16.model.named_parameters(), *bf16.model.named_buffers()]}
    assert bf16.output_basis() is not None
    assert {
        n: t.dtype for n, t in [*bf16.model.named_parameters(), *bf16.model.named_buffers()]
    } == dtypes
    assert torch.float32 in dtypes.values() and torch.bfloat16 in dtypes.values()


def test_unknown_target_and_bad_arguments(tiny_lm_dir, tmp_path):
    with pytest.raises(TargetError, match="not a built-in name"):
        load_target(str(tmp_path / "no-such-model"))
    with pytest.raises(TargetError, match="unknown prompt mode"):
        load_target(str(tiny_lm_dir), mode="assistant")
    with pytest.raises(TargetError, match="unknown dtype"):
        load_target(str(tiny_lm_dir), dtype="int3")
    target = load_target(str(tiny_lm_dir), mode="raw")
    with pytest.raises(TypeError):
        target.next_token_logprobs("a single string")
    with pytest.raises(TargetError, match="steps"):
        target.next_token_logprobs(["x"], steps=0)
    with pytest.raises(TargetError, match="context"):
        target.next_token_logprobs(["word " * 400])


def test_no_chat_template_refuses_chat_modes(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    tok.chat_template = None
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    with pytest.raises(TargetError, match="no chat template"):
        HFTarget(model, tok, name="t", mode="user")


@pytest.mark.embedded
def test_embedded_default_loads_and_answers():
    target = load_target()
    fp = target.fingerprint
    assert fp.name == "smollm2-135m-instruct" and fp.vocab_size == 49152
    assert fp.weights_sha256.startswith("gguf:")
    assert "SmolLM" in target.render("hi")  # the built-in system prompt of its template
    lp = target.next_token_logprobs(["What is the capital of France?", "Say hello."])
    assert lp.shape == (2, 49152)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(2), atol=1e-3)
    # The cached conversion is reused: a second load gives the same identity.
    assert load_target().fingerprint.id == fp.id


def test_api_vectors_are_read_only_under_the_same_chat_setting():
    """An API fingerprint names its chat setting, not the rendered chat: an inverter trained
    locally reads its vectors only if its own template holds the same user turn (system
    modes) or system prompt (user mode)."""
    from dataclasses import replace

    from logit2prompt.targets import TargetFingerprint

    chat = "<|im_start|>system\n{prompt}<|im_end|>\n<|im_start|>user\n%s<|im_end|>\n"
    local = TargetFingerprint("tiny", "w", "t", 384, "guarded", chat % "Hello!", "float32")
    api = TargetFingerprint("openai:x", "api:m", "t", 384, "guarded", "api-chat:guarded", "api")
    asked_otherwise = replace(api, template="api-chat:guarded:Hi there")
    assert local.reading_differences(api) == [] == api.reading_differences(local)
    assert local.reading_differences(asked_otherwise) == [
        "user turn: 'Hi there' is not in the local template"
    ]
    assert replace(local, template=chat % "Hi there").reading_differences(asked_otherwise) == []
    user = replace(local, mode="user", template="<|im_start|>user\n{prompt}<|im_end|>\n")
    brief = replace(api, mode="user", template="api-chat:user:Be brief.")
    assert user.reading_differences(brief) == [
        "system prompt: 'Be brief.' is not in the local template"
    ]
    assert user.reading_differences(replace(brief, template="api-chat:user")) == []


def test_a_chat_template_without_a_system_role_is_a_clear_error(tiny_lm_dir, tmp_path):
    import shutil

    gemma_like = tmp_path / "no-system"
    shutil.copytree(tiny_lm_dir, gemma_like)
    template = gemma_like / "chat_template.jinja"
    refuse = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
    )
    template.write_text(refuse + template.read_text())
    assert load_target(str(gemma_like), mode="user").render("X")  # no system message: fine
    with pytest.raises(TargetError, match="cannot render a system/user chat for guarded mode"):
        load_target(str(gemma_like), mode="guarded")
