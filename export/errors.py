"""Errors of the export toolkit; every message is meant for the person running the export."""

from __future__ import annotations

from clipserve.contract.bundle import BundleError


class ExportError(BundleError):
    """The model cannot be exported as asked; nothing was published."""


class ParityError(ExportError):
    """An exported graph disagrees with the torch model beyond its threshold; nothing was published."""


class SourceError(ExportError):
    """The model to export could not be found or loaded (unknown name, bad checkpoint, offline)."""
