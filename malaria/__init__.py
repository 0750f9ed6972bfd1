"""malaria: a Kaggle pipeline for "Fighting Malaria with CNNs" (NIH red blood cell images).

Data flows one way: zip + CSV (`archive`) -> decoded uint8 cache (`cache`) -> `datamodule` ->
`module` -> predictions (`predict`) -> submission CSV (`submit`) -> Kaggle (`leaderboard`).
Importing the package imports nothing heavy: `make submit` need not load torch.
"""

__version__ = "0.1.0"
