"""Prediction: checkpoints to probabilities (`predictor`), with BatchNorm adapted to slides no
training cell came from (`bn_adaptation`), gathered from every DDP rank (`ddp_writer`), weighed by
each slide's training labels (`slide_prior`), and written and checked as submission CSVs
(`submission`)."""
