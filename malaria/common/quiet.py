"""What Lightning prints that a user of this project need not read, silenced in one place.

Imported by every module that builds a `Trainer` (the CLI's runs and `malaria.prediction.predictor`, which
every predicting verb goes through), so `make predict` is as quiet as `make train`.
"""

import logging
import warnings

# Expected here, not worth a line in every run's output: the module's uint8 -> float batch hook is
# meant to win over the data module's, and Lightning's own pytree call trips a torch deprecation.
warnings.filterwarnings("ignore", message="You have overridden `on_after_batch_transfer`")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# `make cv` and `make sweep` hand the CLI each run's arguments beside their own sys.argv, on purpose.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
# The model summary cannot size bf16 weights; it sizes them as fp32, which is fine for a summary.
warnings.filterwarnings("ignore", message="Precision bf16-mixed is not supported by the model summary")
# Lightning advertises its cloud logger on every Trainer, the project's own included.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip"))
