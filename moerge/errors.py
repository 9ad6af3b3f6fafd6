"""Exception types of moerge.

Every user-facing failure is a :class:`MoergeError` carrying the *file* it concerns, the *field* (a recipe
key path, a tensor name, a config key) and a one-line message.  ``str(err)`` gives
``<file>: <field>: <message>``, which the CLI prints as ``error: ...`` and exits with status 2.
Library code raises; only :mod:`moerge.cli` exits.
"""

from __future__ import annotations

from pathlib import Path


class MoergeError(Exception):
    """A user error: bad recipe, bad checkpoint, bad data. Never a bug in moerge."""

    def __init__(self, file: str | Path | None, field: str | None, message: str) -> None:
        self.file = str(file) if file is not None else None
        self.field = field
        self.message = message
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.field) if p]
        return ": ".join([*parts, self.message])


class RecipeError(MoergeError):
    """The recipe is malformed: unknown key, bad value, duplicate names."""


class CheckpointError(MoergeError):
    """A model folder or safetensors file is missing, corrupt or does not match the base."""


class SourceError(CheckpointError):
    """An expert source (full checkpoint or LoRA adapter) cannot be used."""


class OutputError(MoergeError):
    """The output folder cannot be written (exists, not empty, not writable)."""


class DataError(MoergeError):
    """Calibration data is missing, empty or names an unknown expert."""


class NotSupportedError(MoergeError):
    """A valid input that moerge does not handle yet (DoRA adapters, ...)."""
