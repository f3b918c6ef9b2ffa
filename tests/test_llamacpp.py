"""Recovery against llama-cpp-python's own OpenAI-compatible server (opt-in: `make test-llamacpp`).

Needs a Python with `llama-cpp-python[server]` (compiling llama.cpp takes ~5 minutes on 2
cores): set LLAMACPP_PYTHON to it, or install it into this environment.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import sys

import pytest

from logit2prompt.targets.api.target import OpenAITarget
from logit2prompt.targets.embedded import gguf_path
from logit2prompt.testing import free_port, server_process

pytestmark = [pytest.mark.llamacpp, pytest.mark.embedded, pytest.mark.slow]
PROMPT = "What is the capital of France?"


def _llamacpp_python() -> str:
    given = os.environ.get("LLAMACPP_PYTHON")
    if given and shutil.which(given):
        return given
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    pytest.skip("llama-cpp-python is not installed (set LLAMACPP_PYTHON)")


def test_force_recovery_matches_llamacpp_reported_logprobs(tmp_path):
    from transformers import AutoTokenizer

    from logit2prompt.targets.embedded import converted_dir

    port = free_port()
    cmd = [_llamacpp_python(), "-m", "llama_cpp.server", "--model", str(gguf_path())]
    cmd += ["--logits_all", "true", "--port", str(port), "--model_alias", "smol"]
    url = f"http://127.0.0.1:{port}/v1"
    tokenizer = AutoTokenizer.from_pretrained(str(converted_dir()[0]))
    with server_process(cmd, url + "/models", timeout=300):
        target = OpenAITarget(
            url, "smol", tokenizer=tokenizer, cache_path=tmp_path / "c.sqlite", concurrency=1
        )
        # llama.cpp reports log-probs before logit_bias and always includes the sampled token.
        assert target.probe()[0] == "force"
        top = target.reported_top(PROMPT, 5)
        assert len(top) >= 3
        extra = random.Random(0).sample(range(target.vocab_size), 20)
        vec, report = target.recover(PROMPT, token_ids=[*top, *extra])
        assert report.queries == len(set(top) | set(extra))
        for tid, lp in top.items():
            assert abs(float(vec[tid]) - lp) <= 1e-3
        assert report.unresolved == 0
