"""The Barlow Twins projector: an MLP from a spec such as ``"8192-8192-8192"``.

As in the paper (Sec. 4) and official code: every hidden layer is Linear (no bias) - BatchNorm - ReLU, and the last
layer is a Linear without bias. BatchNorm is synchronised across replicas by default, so its statistics are those of
the global batch and N replicas train exactly as one device does.
"""

from __future__ import annotations

import keras


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
) -> keras.Sequential:
    """Builds the projector MLP; its input width is taken from the first call (the encoder's output).

    Args:
      spec: layer widths; the last is the embedding dimension D of the cross-correlation matrix.
      synchronized_bn: compute BatchNorm statistics over the global batch under `tf.distribute` (exact equivalence
        with single-device training). Costs one small all-reduce per BN layer.
      name: the model's name.

    Example:
      >>> head = projector("2048-2048-2048")
      >>> head(keras.ops.zeros([4, 512])).shape
      TensorShape([4, 2048])
    """
    widths = parse_spec(spec)
    layers = []
    for i, width in enumerate(widths[:-1]):
        layers += [
            keras.layers.Dense(width, use_bias=False, name=f"dense_{i}"),
            # momentum / epsilon as torch's BatchNorm1d defaults (0.1 update rate, 1e-5).
            keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=synchronized_bn, name=f"bn_{i}"),
            keras.layers.ReLU(name=f"relu_{i}"),
        ]
    layers.append(keras.layers.Dense(widths[-1], use_bias=False, name=f"dense_{len(widths) - 1}"))
    return keras.Sequential(layers, name=name)
