"""logit2prompt: recover hidden prompts from a language model's next-token distributions."""

from .targets import DEFAULT_TARGET, Target, TargetFingerprint, load_target

__version__ = "0.1.0"

__all__ = ["DEFAULT_TARGET", "Target", "TargetFingerprint", "__version__", "load_target"]
