"""zerolm: Transformer training with ZeRO stages and tensor parallelism as config choices."""
