"""The run around the model: the CLI every training verb builds (`cli`), crash-safe checkpoints and
exact resume (`checkpointing`), `last.ckpt` on SIGTERM or Ctrl-C (`preemption`), the CSV and W&B
loggers (`loggers`), run folders (`run_dirs`), sweep spaces checked by the CLI's own parser
(`search_space`), and where a training step's time goes (`step_profile`)."""
