"""Scoring recovered prompts: metrics with CIs, semantic and functional similarity, the
`evaluate` pipeline and its HTML report."""
