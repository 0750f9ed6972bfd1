"""The run around the model: the CLI every training verb builds (`cli`), crash-safe checkpoints and
exact resume (`checkpointing`), `last.ckpt` on SIGTERM or Ctrl-C (`preemption`), the CSV and W&B
loggers (`loggers`), run folders (`run_dirs`), the holdout accuracy with the slide prior per epoch
(`prior_accuracy`), sweep spaces checked by the CLI's own parser (`search_space`) and a sweep's
store, sampler and pruners (`studies`), and where a training step's time goes (`step_profile`)."""
