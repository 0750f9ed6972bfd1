"""Prediction: checkpoints to probabilities (`predictor`), gathered from every DDP rank
(`ddp_writer`), weighed by each slide's training labels (`slide_prior`), and written and checked as
submission CSVs (`submission`)."""
