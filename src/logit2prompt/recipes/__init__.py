"""Pipelines wired from the components: the method registry and the quickstart."""
