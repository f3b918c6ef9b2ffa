"""Exceptions with messages that say what went wrong and what to do about it."""


class Logit2PromptError(Exception):
    """Base class: every error this package raises on bad input."""


class TargetError(Logit2PromptError):
    """A target model could not be found, loaded or run."""


class CorpusError(Logit2PromptError):
    """A prompt corpus could not be read or is empty after filtering."""


class PackageUnavailable(CorpusError):
    """The package index answered but no longer serves a release a corpus is built from."""


class StoreError(Logit2PromptError):
    """A distribution store is missing, corrupted, or belongs to another target."""


class VectorError(Logit2PromptError):
    """A log-prob vector has the wrong shape or non-finite values."""


class CheckpointError(Logit2PromptError):
    """An inverter checkpoint is missing, corrupted, or foreign."""
