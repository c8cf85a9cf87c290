"""Training machinery: optimizer and schedules from the config, train state, checkpoints, logging."""
