"""One switch for every fast path, so a numerics question can be bisected in one run.

The library computes each step two ways that are the same maths: the plain formulation (the paper's formula
autodiffed, each view through the projector on its own, Keras' BatchNormalization ops, LARS as TensorFlow ops) and
fast paths that tests hold equal to it:

* the loss's hand-written gradient and its Gram-matrix form, chosen by cost (`bt_keras.method.loss_forms`: B <= D on one
  replica; under several, B < D, with the embeddings all-gathered instead of the D x D matrix all-reduced);
* the projector's Dense layers run once on both views stacked (`bt_keras.nets.heads.project_views`);
* TensorFlow's fused BatchNorm kernel where statistics are local, and under several replicas the synchronised
  BatchNorm with one all-reduce each way and one-pass native CPU kernels (`bt_keras.nets.batch_norm.BatchNormalization`,
  `bt_keras.nets.batch_norm`);
* LARS as one native CPU op per variable, each replica's copy included (`bt_keras.kernels`,
  `bt_keras.method.optim.LARS`).

`BT_KERAS_FAST=0` in the environment (or `set_enabled(False)`, or a recipe's `config.fast_paths = False`) turns all
of them off; the decision is read when a step is traced, so set it before training starts. `BT_KERAS_NATIVE=0` turns
off the native kernels alone.
"""

from __future__ import annotations

import os

ENV = "BT_KERAS_FAST"
_override: bool | None = None


def enabled() -> bool:
    """True unless the fast paths were turned off (`set_enabled(False)` first, else `BT_KERAS_FAST=0`)."""
    if _override is not None:
        return _override
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def set_enabled(value: bool | None) -> None:
    """Turns every fast path on (True) or off (False) for this process; None returns to the environment's choice."""
    global _override
    if value not in (None, True, False):
        raise ValueError(f"fast_paths.set_enabled takes True, False or None, got {value!r}.")
    _override = value
