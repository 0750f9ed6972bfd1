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
# Lightning advertises its cloud logger on every Trainer, the project's own included.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip"))
