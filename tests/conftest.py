"""Shared fixtures: a tiny random causal LM with a real tokenizer and chat template."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

FIXTURE_PROMPTS = [
    "What is the capital of France?",
    "Translate good morning into German.",
    "List three prime numbers.",
    "Who wrote the play Hamlet?",
    "The opposite of hot is",
    "Name a colour of the rainbow.",
    "How many legs does a spider have?",
    "Write a haiku about the sea.",
    "Is a tomato a fruit or a vegetable?",
    "What is two plus two?",
    "Spell the word necessary.",
    "Give me a synonym for happy.",
    "Which planet is closest to the sun?",
    "Complete the sentence: the early bird",
    "What language is spoken in Brazil?",
    "Summarise the plot of Cinderella.",
    "How do you boil an egg?",
    "Define the word photosynthesis.",
    "Count backwards from five.",
    "What is the square root of nine?",
]


def _train_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = FIXTURE_PROMPTS * 5 + ["system user assistant You are tiny. Hello!"] * 5
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def make_tiny_lm(path: Path, seed: int = 0) -> Path:
    """Save a 2-layer random Llama with a trained BPE tokenizer to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform distributions; sharpen them so greedy steps and
    # inversion have something to see.
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(path)
    return path


def accelerate_launch(*module_args: str) -> list[str]:
    """`accelerate launch` of `python -m MODULE ARGS` with 2 processes, as users run it."""
    import sys

    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        *module_args,
    ]


def tiny_train_config(data, out, tokenizer_dir, **overrides):
    """A TrainConfig for the 'tiny' preset that trains in seconds: fp32, no progress bar,
    no periodic evaluation or checkpoints unless asked, short outputs."""
    from logit2prompt.training.trainer import TrainConfig

    base = dict(
        data=str(data),
        out=str(out),
        preset="tiny",
        output_tokenizer=str(tokenizer_dir),
        per_device_batch_size=8,
        max_steps=20,
        lr=3e-3,
        warmup_steps=0,
        schedule="constant",
        mixed_precision="no",
        eval_every=10**6,
        save_every=10**6,
        progress=False,
        overrides={"max_length": 24},
    )
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "prompts.jsonl"
    with open(path, "w") as f:
        for i, p in enumerate(FIXTURE_PROMPTS):
            f.write(json.dumps({"prompt": p, "task": f"t{i % 3}"}) + "\n")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep tests out of the user's cache, except the converted embedded model (slow to make)."""
    shared = os.environ.get("LOGIT2PROMPT_TEST_CACHE") or str(
        tmp_path_factory.getbasetemp() / "cache"
    )
    monkeypatch.setenv("LOGIT2PROMPT_CACHE", shared)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
