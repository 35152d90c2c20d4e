"""Shipping a model: an adapter merged into its base as a plain HF folder, or as one GGUF file."""
