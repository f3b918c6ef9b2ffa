"""Turning observations into prompts: inversion, nearest-neighbour search, re-ranking and
refinement by the target, and the baselines (extraction strings, few-shot prompting)."""
