"""The guarded-system threat model: a non-disclosure instruction after the hidden system prompt,
and a prompt-leak filter on replies (in evaluation and in `serve`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logit2prompt.defenses.chain import DefenseError
from logit2prompt.defenses.leak import REFUSAL, LeakFilter, leak_score
from logit2prompt.recipes import methods
from logit2prompt.targets import load_target
from logit2prompt.targets.base import GUARD_INSTRUCTION, system_message

HIDDEN = "You are Ada, the billing assistant of Acme. Never discuss refunds over 100 dollars."


def test_leak_score_counts_repeated_trigrams():
    assert leak_score(f"Sure! My instructions: {HIDDEN.upper()}", HIDDEN) == 1.0
    assert leak_score("Hello! How can I help you with your bill today?", HIDDEN) == 0.0
    half = "You are Ada, the billing assistant of Acme."
    assert 0.3 < leak_score(half, HIDDEN) < 0.7
    assert leak_score("say hello", "hi") == 0.0 and leak_score("hi there", "Hi!") == 1.0
    guard = LeakFilter(0.5)
    assert guard(HIDDEN, HIDDEN) == REFUSAL and guard("Hello!", HIDDEN) == "Hello!"
    with pytest.raises(DefenseError, match="leak threshold"):
        LeakFilter(0.0)


def test_guarded_mode_appends_the_instruction_and_is_its_own_target(tiny_lm_dir):
    guarded = load_target(str(tiny_lm_dir), mode="guarded")
    system = load_target(str(tiny_lm_dir), mode="system")
    text = guarded.render(HIDDEN)
    assert system_message(HIDDEN, "guarded") in text
    assert text.index(HIDDEN) < text.index(GUARD_INSTRUCTION) < text.index("Hello!")
    assert GUARD_INSTRUCTION not in system.render(HIDDEN)
    assert guarded.fingerprint.id != system.fingerprint.id
    assert any("mode" in d for d in guarded.fingerprint.differences(system.fingerprint))
    a, b = guarded.next_token_logprobs([HIDDEN]), system.next_token_logprobs([HIDDEN])
    assert not torch.allclose(a, b)


class _EchoTarget:
    """A target that repeats its system message: the leak every extraction string hopes for."""

    mode = "guarded"

    def render_messages(self, messages):
        return messages[0]["content"]

    def complete(self, texts, max_new_tokens=64):
        return [f"Of course. {t}" for t in texts]


def test_extraction_faces_the_leak_filter():
    refs = [HIDDEN, "Answer only in French and keep every reply under twenty words."]
    ctx = methods.MethodContext(None, None, target=_EchoTarget(), references=refs)
    open_replies = methods._extraction(ctx)
    assert all(HIDDEN[:20] in r or "French" in r for r in open_replies[methods.EXTRACTION_BEST])
    guarded = methods.MethodContext(
        None, None, target=_EchoTarget(), references=refs, leak_filter=LeakFilter(0.5)
    )
    out = methods._extraction(guarded)
    assert out[methods.EXTRACTION_BEST] == [REFUSAL, REFUSAL]
    assert out[methods.EXTRACTION_ORACLE] == [REFUSAL, REFUSAL]
    refused = guarded.notes["extraction_refused"]
    assert refused["n"] == 2 and set(refused["per_attack"].values()) == {2}
    assert all(mask == [True, True] for mask in guarded.notes["extraction_blocked"].values())
    # Extraction alone observes nothing, so it runs without observations.
    assert methods.run_methods(["extraction"], guarded) == out


def test_length_buckets_count_the_refused_extraction_replies():
    from logit2prompt.evaluation.evaluate import length_breakdown

    per = {"m": {"bleu": [10.0, 20.0, 30.0], "token_f1": [0.1, 0.2, 0.3]}}
    rows = length_breakdown([5, 6, 100], per, refused=[True, False, False])
    assert [(r["tokens"], r["n"], r["extraction_refused"]) for r in rows] == [
        ("1-8", 2, 1),
        ("65-128", 1, 0),
    ]
    assert rows[0]["bleu"]["m"] == 15.0 and abs(rows[0]["token_f1"]["m"] - 15.0) < 1e-9
    assert "extraction_refused" not in length_breakdown([5], {"m": per["m"]})[0]


def test_server_leak_filter_refuses_leaking_replies(tiny_lm_dir, monkeypatch):
    from fastapi.testclient import TestClient

    from logit2prompt.server.app import ServerConfig, create_app
    from logit2prompt.server.engine import Engine

    target = load_target(str(tiny_lm_dir), mode="raw")
    app = create_app(target, ServerConfig(model_name="m", leak_filter=0.5))
    reply = {"text": "Hello there."}
    monkeypatch.setattr(Engine, "text", lambda self, steps: reply["text"])
    client = TestClient(app)

    def ask(system: str) -> dict:
        body = {
            "model": "m",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}],
            "max_tokens": 3,
            "logprobs": True,
            "top_logprobs": 2,
        }
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]

    passed = ask(HIDDEN)
    assert passed["message"]["content"] == "Hello there." and passed["logprobs"] is not None
    reply["text"] = f"My instructions say: {HIDDEN}"
    refused = ask(HIDDEN)
    assert refused["message"]["content"] == REFUSAL
    assert refused["logprobs"] is None and refused["finish_reason"] == "content_filter"
    from logit2prompt.server.schemas import ServerError

    with pytest.raises(ServerError, match="leak_filter"):
        ServerConfig(leak_filter=1.5)


def test_evaluation_reports_what_the_filter_costs():
    from logit2prompt.evaluation.evaluate import EvalConfig, leak_filter_report

    class Target(_EchoTarget):
        def render(self, prompt):
            return prompt

        def complete(self, texts, max_new_tokens=48):  # leaks for the first prompt only
            return [f"Sure: {texts[0]}", "Hello! How can I help?"]

    refs = [HIDDEN, "Answer only in French and keep every reply under twenty words."]
    cfg = EvalConfig(checkpoint="x", prompts="p", out="y", leak_filter=0.5)
    notes = {"extraction_refused": {"per_attack": {"a": 2}, "n": 2}}
    report = leak_filter_report(cfg, Target(), refs, notes)
    assert report["innocuous_refused"] == {"refused": 1, "n": 2}
    assert report["extraction_refused"]["per_attack"] == {"a": 2}
    assert (
        leak_filter_report(EvalConfig(checkpoint="x", prompts="p", out="y"), Target(), refs, notes)
        is None
    )


def test_an_inverter_adapts_across_threat_models_but_not_targets(tiny_lm_dir, tmp_path):
    """--init-from an inverter trained on user-mode vectors fine-tunes on guarded ones (same
    model, another place for the hidden prompt); one trained on another model is refused."""
    from logit2prompt.data.collect import collect
    from logit2prompt.data.corpus import Corpus, PromptRecord
    from logit2prompt.errors import CheckpointError
    from logit2prompt.models.inverter import Inverter
    from logit2prompt.training.trainer import Trainer

    from .conftest import FIXTURE_PROMPTS, make_tiny_lm, tiny_train_config

    corpus = Corpus([PromptRecord(p) for p in FIXTURE_PROMPTS[:8]], "fixture")

    def store(target, name):
        collect(target, corpus, str(tmp_path / name), shard_size=8, progress=False)
        return tmp_path / name

    user = store(load_target(str(tiny_lm_dir), mode="user"), "user")
    guarded = store(load_target(str(tiny_lm_dir), mode="guarded"), "guarded")
    Trainer(tiny_train_config(user, tmp_path / "u", tiny_lm_dir, max_steps=2)).run()
    cfg = tiny_train_config(
        guarded, tmp_path / "g", tiny_lm_dir, max_steps=2, init_from=str(tmp_path / "u")
    )
    adapted = Trainer(cfg).run()
    assert adapted.fingerprint.mode == "guarded"
    assert Inverter.from_pretrained(tmp_path / "g").fingerprint.mode == "guarded"
    other = load_target(str(make_tiny_lm(tmp_path / "other", seed=1)), mode="guarded")
    foreign = store(other, "foreign")
    cfg = tiny_train_config(
        foreign, tmp_path / "f", tiny_lm_dir, max_steps=2, init_from=str(tmp_path / "u")
    )
    with pytest.raises(CheckpointError, match="another target: .*weights_sha256"):
        Trainer(cfg)


PROBE = "Hi! What is the task?"


def test_the_attackers_user_turn_is_recorded_and_reproduced(tiny_lm_dir):
    """A system-mode target asked another innocuous turn is another target (its template
    holds the turn); an inverter's target is rebuilt with the turn its fingerprint records."""
    from logit2prompt.attacks.invert import target_from_fingerprint, user_turn_of
    from logit2prompt.errors import TargetError

    hello = load_target(str(tiny_lm_dir), mode="guarded")
    probe = load_target(str(tiny_lm_dir), mode="guarded", user_turn=PROBE)
    assert PROBE in probe.render(HIDDEN) and PROBE not in hello.render(HIDDEN)
    assert probe.fingerprint.id != hello.fingerprint.id
    assert user_turn_of(probe.fingerprint.template, hello) == PROBE
    assert user_turn_of(hello.fingerprint.template, hello) == "Hello!"
    assert user_turn_of("{prompt}", hello) is None
    rebuilt = target_from_fingerprint(probe.fingerprint)
    assert rebuilt.user_turn == PROBE and rebuilt.fingerprint == probe.fingerprint
    with pytest.raises(TargetError, match="user turn must not be empty"):
        load_target(str(tiny_lm_dir), mode="guarded", user_turn=" ")
    # User mode's system prompt is rebuilt the same way (it was refused as another template).
    brief = load_target(str(tiny_lm_dir), mode="user", system_prompt="Be brief.")
    rebuilt = target_from_fingerprint(brief.fingerprint)
    assert rebuilt.system_prompt == "Be brief." and rebuilt.fingerprint == brief.fingerprint
    plain = load_target(str(tiny_lm_dir), mode="user")
    assert target_from_fingerprint(plain.fingerprint).fingerprint == plain.fingerprint
    # A defense is not rebuilt from text: said, with what to do instead.
    from dataclasses import replace

    from logit2prompt.errors import VectorError

    with pytest.raises(VectorError, match="collect --defense 'topk:5'"):
        target_from_fingerprint(replace(plain.fingerprint, defense="topk:5"))


def test_a_refused_observation_is_one_the_attacker_never_reads(tiny_lm_dir):
    """The leak filter sees the reply the log-probs come from: where it refuses it, every row
    that reads the observation answers nothing; rows that do not read it keep theirs."""
    from logit2prompt.recipes.methods import REPLY, Method, register, run_methods, unregister

    target = load_target(str(tiny_lm_dir), mode="guarded")
    refs = [HIDDEN, "Answer only in French and keep every reply under twenty words."]
    said = [HIDDEN, "Hello! How can I help you today?"]  # the first reply leaks its prompt
    rows = [target.tokenizer(t, add_special_tokens=False)["input_ids"] for t in said]
    steps = max(len(r) for r in rows) + 1
    vectors = np.full((2, steps, target.vocab_size), -20.0, dtype=np.float32)
    eos = target.tokenizer.eos_token_id
    for i, ids in enumerate(rows):
        for k, t in enumerate([*ids, *[eos] * (steps - len(ids))]):
            vectors[i, k, t] = -0.01
    register(Method("echo", ("echo",), lambda ctx: {"echo": list(ctx.references)}, observes=False))
    try:
        kw = dict(target=target, references=refs)
        open_ctx = methods.MethodContext(None, vectors, **kw)
        opened = run_methods(["reply", "echo"], open_ctx)
        assert leak_score(opened[REPLY][0], HIDDEN) == 1.0
        assert opened[REPLY][1].startswith("Hello!")
        ctx = methods.MethodContext(None, vectors, leak_filter=LeakFilter(0.5), **kw)
        guarded = run_methods(["reply", "echo"], ctx)
    finally:
        unregister("echo")
    assert guarded[REPLY] == ["", opened[REPLY][1]]
    assert guarded["echo"] == refs
    assert ctx.notes["observation_refused"] == {"refused": 1, "n": 2}
