"""Training: the pure step, the one loop, the sharded state, optimizer, checkpoints, health, metrics, fine-tuning."""
