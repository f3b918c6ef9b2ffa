"""Targets behind an OpenAI-compatible HTTP API: full distributions recovered from top-k
log-probs and `logit_bias`."""

from .target import OpenAITarget, QueryBudgetExceeded, parse_openai_spec, resolve_api_target

__all__ = ["OpenAITarget", "QueryBudgetExceeded", "parse_openai_spec", "resolve_api_target"]
