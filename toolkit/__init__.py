"""Layer-to-layer analyses of language models on TransformerLens and nnsight."""
