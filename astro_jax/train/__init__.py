"""Training pieces shared by the sft and rl stages: data, losses, optimizer, step, checkpoints, metrics."""
