"""Typed errors. Each message says what is wrong and what to do about it."""


class ConceptEditError(Exception):
    """Base class of every error the library raises on purpose."""


class UnknownArchitectureError(ConceptEditError):
    """The model is not one of the families in `editing.arch`."""


class FingerprintMismatchError(ConceptEditError):
    """An edit or mask was made for another model family or layout."""


class EditFileError(ConceptEditError):
    """An edit file is malformed, not safetensors, or inconsistent with its own metadata."""


class InvalidInputError(ConceptEditError):
    """Bad user input: empty concept list, unknown preset, out-of-range parameter."""


class NonFiniteError(ConceptEditError):
    """A computed edit contains NaN or Inf; nothing was applied."""


class Cancelled(ConceptEditError):
    """The host asked to stop; nothing was applied."""
