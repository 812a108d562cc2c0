"""bt_keras: Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny, ICML 2021) for TensorFlow/Keras.

The method in a few names:
  `BarlowTwins(encoder, projector)`  a keras.Model whose train_step minimises the loss, exact under tf.distribute
  `barlow_twins_loss`, `cross_correlation`  the loss over the global batch (bt_keras.method.losses)
  `backbones.resnet50/resnet18/...`, `heads.projector("8192-8192-8192")`  the networks
  `LARS`, `WarmupCosine`  the paper's optimizer and schedule (bt_keras.method.optim), and solo-learn's form of them
  `OnlineProbe`  a linear classifier trained on stop-gradient features during pre-training (bt_keras.method.probe)

The architecture, module by module: docs/ARCHITECTURE.md. Importing `bt_keras` loads no TensorFlow: the names above
are resolved from their modules on first use, so recipes (`experiments/*.py`, which read `bt_keras.config`) and the
serving client stay light.
"""

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it (a module name maps to itself).
_PUBLIC = {
    "BarlowTwins": "method.model",
    "LARS": "method.optim",
    "OnlineProbe": "method.probe",
    "WarmupCosine": "method.optim",
    "barlow_twins_loss": "method.losses",
    "cross_correlation": "method.losses",
    "augment": "augment",
    "backbones": "nets.backbones",
    "data": "data",
    "heads": "nets.heads",
    "losses": "method.losses",
    "optim": "method.optim",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'bt_keras' has no attribute {name!r}")
    module = importlib.import_module(f"bt_keras.{_PUBLIC[name]}")
    return module if _PUBLIC[name].rpartition(".")[2] == name else getattr(module, name)
