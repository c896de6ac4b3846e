"""Input pipeline: sources, tokenizers, batches."""
