"""Transformer models (flax.nnx) and their loss."""
