"""Training: the trainer loop, EMA, stage schedule, checkpoints, metrics, distributed setup."""
