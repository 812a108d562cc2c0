"""Choosing a `tf.distribute` strategy by name, and the checks every strategy needs before anything is built."""

from __future__ import annotations

import json
import os

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def check_global_batch(global_batch_size: int, num_replicas: int) -> int:
    """Returns the per-replica batch size, or raises ValueError when the global batch does not split evenly.

    Barlow Twins' statistics are global, so an uneven split would still be exact here, but the recipes' learning
    rates and the paper's numbers assume a fixed global batch: we require an even split and say how to get one.
    """
    if global_batch_size < 2:
        raise ValueError(
            f"Global batch size {global_batch_size} is too small: Barlow Twins normalises along the batch and needs "
            "at least 2 examples (the paper uses 2048)."
        )
    if global_batch_size % num_replicas:
        lower = global_batch_size - global_batch_size % num_replicas
        raise ValueError(
            f"Global batch size {global_batch_size} is not divisible by the number of replicas ({num_replicas}). "
            f"Use a multiple of {num_replicas}, e.g. {lower or num_replicas} or {lower + num_replicas}."
        )
    return global_batch_size // num_replicas
