"""The run around the model: the CLI every training verb builds (`cli`), crash-safe checkpoints and
exact resume (`checkpointing`), the CSV and W&B loggers (`loggers`), and run folders (`run_dirs`)."""
