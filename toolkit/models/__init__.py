"""Model loading: the registry, the embedded default, hub ids, local folders, tiny random models."""
from toolkit.models.registry import DEFAULT_MODEL, REGISTRY, ModelEntry, find_entry, known_ids


def __getattr__(name: str):
    # Lazy: loading imports the backends, which import toolkit.models.architectures.
    if name in ("load_model", "resolve_dtype"):
        from toolkit.models import loading
        return getattr(loading, name)
    raise AttributeError(name)


__all__ = ["load_model", "resolve_dtype", "DEFAULT_MODEL", "REGISTRY", "ModelEntry", "find_entry", "known_ids"]
