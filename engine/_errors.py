"""Exceptions with messages meant for people: each names the bad value and what to do."""
from __future__ import annotations


class AttribError(Exception):
    """Base class of every error the engine reports to a user (the CLI prints these without a traceback)."""


class SourceError(AttribError):
    """The training-set source cannot be read (missing path, unknown format, missing columns)."""


class EmptyCorpusError(AttribError):
    """Nothing could be indexed: the source is empty or every record was rejected."""


class IndexFormatError(AttribError):
    """An index folder is missing, damaged, foreign or from an unsupported format version."""


class ModelMismatchError(AttribError):
    """Query-side models (or a weights file) do not match the models the index was built with."""


class WeightsUnavailableError(AttribError):
    """Pretrained model weights are not available locally and cannot be fetched."""


class QueryInputError(AttribError):
    """A query image or prompt cannot be used."""


class FusionWeightsError(AttribError):
    """A fusion weights file is malformed, of another format version, or learned for other models/features."""


class UnknownNameError(AttribError, KeyError):
    """A registry lookup failed; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class IndexBusyError(AttribError):
    """Another process is writing the index folder (the writer lock is held)."""


class OutputError(AttribError):
    """An output file or folder (report, weights file, benchmark) cannot or must not be written there."""
