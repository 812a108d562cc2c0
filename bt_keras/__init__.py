"""bt_keras: Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny, ICML 2021) for TensorFlow/Keras.

The method in a few names:
  `BarlowTwins(encoder, projector)`  a keras.Model whose train_step minimises the loss, exact under tf.distribute
  `barlow_twins_loss`, `cross_correlation`  the loss over the global batch (bt_keras.losses)
  `backbones.resnet50/resnet18/...`, `heads.projector("8192-8192-8192")`  the networks
  `LARS`, `WarmupCosine`  the paper's optimizer and schedule (bt_keras.optim)
"""

from bt_keras import backbones, heads, losses, optim
from bt_keras.losses import barlow_twins_loss, cross_correlation
from bt_keras.model import BarlowTwins
from bt_keras.optim import LARS, WarmupCosine

__version__ = "0.1.0"

__all__ = [
    "BarlowTwins",
    "LARS",
    "WarmupCosine",
    "backbones",
    "barlow_twins_loss",
    "cross_correlation",
    "heads",
    "losses",
    "optim",
]
