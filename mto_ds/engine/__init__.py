"""DeepSpeed integration: the train step, checkpoints, resume, telemetry (imports deepspeed lazily)."""
