"""Target models: prompts in, next-token log-prob distributions out."""

from __future__ import annotations

from .base import PROMPT_MODES, Target, TargetFingerprint, check_prompt_options
from .embedded import DEFAULT_TARGET
from .hf import HFTarget


def load_target(
    name_or_path: str = DEFAULT_TARGET,
    *,
    mode: str = "user",
    dtype: str = "float32",
    device: str | None = None,
    system_prompt: str | None = None,
    batch_size: int | None = None,
    user_turn: str | None = None,
) -> Target:
    """Load a target by built-in name, local directory, GGUF file, or Hugging Face Hub id
    (`user_turn`: the attacker's innocuous turn in the system modes; default "Hello!")."""
    check_prompt_options(mode, system_prompt, user_turn)  # before any weights load
    kwargs = {"mode": mode, "system_prompt": system_prompt, "user_turn": user_turn}
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    if name_or_path == DEFAULT_TARGET:
        from .embedded import converted_dir

        path, digest = converted_dir()
        return HFTarget.from_pretrained(
            str(path),
            dtype=dtype,
            device=device,
            name=DEFAULT_TARGET,
            weights_sha256=f"gguf:{digest}",
            **kwargs,
        )
    return HFTarget.from_pretrained(name_or_path, dtype=dtype, device=device, **kwargs)


__all__ = [
    "DEFAULT_TARGET",
    "PROMPT_MODES",
    "HFTarget",
    "Target",
    "TargetFingerprint",
    "load_target",
]
