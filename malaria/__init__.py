"""malaria: a Kaggle pipeline for "Fighting Malaria with CNNs" (NIH red blood cell images).

Data flows one way: zip + CSV (`archive`) -> decoded uint8 cache (`cache`) -> `datamodule` ->
`module` -> predictions (`predict`) -> submission CSV (`submit`) -> Kaggle (`leaderboard`).
"""

from malaria import models  # noqa: F401  registers malaria_cnn with timm

__version__ = "0.1.0"
