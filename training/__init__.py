"""itmkit training: data loading from shards, models, losses, evaluation, checkpoints."""
