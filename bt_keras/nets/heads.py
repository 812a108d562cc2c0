"""The Barlow Twins projector: an MLP from a spec such as ``"8192-8192-8192"``.

As in the paper (Sec. 4) and official code: every hidden layer is Linear (no bias) - BatchNorm - ReLU, and the last
layer is a Linear without bias. `use_bias=True` gives every Linear a bias, as solo-learn's projector
(solo/methods/barlow_twins.py: `nn.Linear(...)` with PyTorch's default bias). BatchNorm is synchronised across replicas by default, so its statistics are those of
the global batch and N replicas train exactly as one device does.
"""

from __future__ import annotations

import keras

from bt_keras import fast_paths
from bt_keras.nets.batch_norm import BatchNormalization


def parse_spec(spec: str | list[int] | tuple[int, ...]) -> list[int]:
    """`"8192-8192-8192"` (or a sequence of ints) -> `[8192, 8192, 8192]`, validated."""
    if isinstance(spec, str):
        try:
            widths = [int(part) for part in spec.split("-")]
        except ValueError:
            raise ValueError(f"Projector spec {spec!r} is not a '-'-separated list of widths, e.g. '8192-8192-8192'.")
    else:
        widths = [int(w) for w in spec]
    if not widths or any(w <= 0 for w in widths):
        raise ValueError(f"Projector spec {spec!r} needs one or more positive widths, e.g. '8192-8192-8192'.")
    return widths


def projector(
    spec: str | list[int] = "8192-8192-8192",
    *,
    synchronized_bn: bool = True,
    name: str = "projector",
    use_bias: bool = False,
) -> keras.Sequential:
    """Builds the projector MLP; its input width is taken from the first call (the encoder's output).

    Args:
      spec: layer widths; the last is the embedding dimension D of the cross-correlation matrix.
      synchronized_bn: compute BatchNorm statistics over the global batch under `tf.distribute` (exact equivalence
        with single-device training). Costs one small all-reduce per BN layer.
      name: the model's name.
      use_bias: give every Dense layer a bias (solo-learn's projector); False as the official code.

    Example:
      >>> head = projector("2048-2048-2048")
      >>> head(keras.ops.zeros([4, 512])).shape
      TensorShape([4, 2048])
    """
    widths = parse_spec(spec)
    layers = []
    for i, width in enumerate(widths[:-1]):
        layers += [
            keras.layers.Dense(width, use_bias=use_bias, name=f"dense_{i}"),
            # momentum / epsilon as torch's BatchNorm1d defaults (0.1 update rate, 1e-5).
            BatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=synchronized_bn, name=f"bn_{i}"),
            keras.layers.ReLU(name=f"relu_{i}"),
        ]
    layers.append(keras.layers.Dense(widths[-1], use_bias=use_bias, name=f"dense_{len(widths) - 1}"))
    return keras.Sequential(layers, name=name)


_ROW_WISE = (keras.layers.Dense, keras.layers.ReLU, keras.layers.Activation, keras.layers.LayerNormalization)


def project_views(projector: keras.Model, features1, features2, training=None):
    """`(projector(features1), projector(features2))`, computed with each Dense layer applied once to both views.

    A Dense layer acts row by row, so running it on the two views stacked along the batch is the same maths as two
    calls; BatchNormalization layers still see each view on its own (per-view statistics, as the official code, in
    the same order: view 1, then view 2). With the paper's 8192-wide projector and small per-device batches, the
    Dense layers are bound by reading their 256 MiB kernels: one pass instead of two forward and backward, and one
    kernel gradient instead of two summed (measured: README, "Performance"). Projectors with other layer types, or
    not yet built, are called once per view.
    """
    import tensorflow as tf

    layers = [l for l in getattr(projector, "layers", []) if not isinstance(l, keras.layers.InputLayer)]
    row_wise_or_bn = all(isinstance(l, _ROW_WISE + (keras.layers.BatchNormalization,)) for l in layers)
    stackable = isinstance(projector, keras.Sequential) and projector.built and layers and row_wise_or_bn
    if not (stackable and fast_paths.enabled()):
        return projector(features1, training=training), projector(features2, training=training)
    batch = features1.shape[0] if features1.shape[0] is not None else tf.shape(features1)[0]  # static when known
    x = tf.concat([features1, features2], axis=0)
    for layer in layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            x1, x2 = x[:batch], x[batch:]
            x = tf.concat([layer(x1, training=training), layer(x2, training=training)], axis=0)
        else:
            x = layer(x, training=training)
    return x[:batch], x[batch:]
