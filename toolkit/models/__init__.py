"""Where models come from: the registry, the embedded default, weights, tiny random models, placement.

This package never imports the backends; :func:`toolkit.load_model` (in :mod:`toolkit.loading`)
composes a model from here with a backend.
"""
from toolkit.models.registry import DEFAULT_MODEL, REGISTRY, ModelEntry, find_entry, known_ids

__all__ = ["DEFAULT_MODEL", "REGISTRY", "ModelEntry", "find_entry", "known_ids"]
