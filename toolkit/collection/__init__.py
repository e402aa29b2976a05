"""Collection of hidden states at layer boundaries, streamed to an atomic on-disk cache."""
from toolkit.collection.pairs import (CollectedStates, boundaries_for, collect_hidden_states, load_collected,
                                      model_fingerprint)

__all__ = ["CollectedStates", "collect_hidden_states", "load_collected", "boundaries_for", "model_fingerprint"]
