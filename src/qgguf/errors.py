"""Errors qgguf raises on purpose.

Every error a user can cause (bad file, bad option, missing model) is a :class:`QggufError`.
The CLI prints it as one line ``qgguf: error: <file>: <problem>`` and exits with code 2.
"""
from __future__ import annotations

from pathlib import Path


class QggufError(Exception):
    """Base class: a problem with the user's input, named with the file it concerns."""

    def __init__(self, problem: str, path: str | Path | None = None):
        self.problem = problem
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def at(self, path: str | Path | None) -> "QggufError":
        """This error naming ``path``, if it names no file yet (a decoder deep in a call does not know the file;
        the reader that called it adds it)."""
        if self.path is not None or path is None:
            return self
        try:
            e = type(self)(self.problem, path)
        except TypeError:
            e = QggufError(self.problem, path)
        e.__cause__ = self.__cause__
        return e


class InputFileError(QggufError):
    """A missing, unreadable, truncated or corrupt input file."""


class UnsupportedModelError(QggufError):
    """A model whose architecture or tensor layout qgguf cannot handle."""


class BadWeightsError(QggufError):
    """Weights that cannot be quantized (NaN or infinite values)."""


class OptionError(QggufError):
    """An invalid command-line option or API argument."""


class OutputError(QggufError):
    """The output cannot be written (read-only folder, disk full)."""
