"""Weighted k-nearest-neighbour accuracy of frozen features, the monitor of most self-supervised papers.
(The CLI: `python -m bt_keras.evaluate.knn`.)

The rule (Wu et al. 2018, "Unsupervised feature learning via non-parametric instance discrimination", Sec. 3.4;
k=200 and T=0.1 as there and in solo-learn / most SSL codebases): features are L2-normalised, so similarity is
the cosine; each test image takes its k most similar training images, and each neighbour votes for its class with
weight exp(sim / T); the class scores are the summed votes; top-1 / top-5 rank the classes by score.

Ties are broken by index, as `tf.math.top_k` does: among equally similar neighbours the lower training index is
taken first, and among classes with equal scores the lower class index ranks first.

In TensorFlow: test features are processed in chunks (one [chunk, N_train] similarity matrix at a time, the chunk
sized to keep it near 64 M entries), `tf.math.top_k` picks the neighbours and a segment sum adds the votes. The
votes are computed as exp((sim - 1) / T), the same ranking scaled by exp(-1/T), so that no temperature overflows.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf



DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.1
_SIMILARITY_BUDGET = 64 * 1024 * 1024  # entries of one chunk's similarity matrix (256 MB in float32)


def _unit_rows(x: tf.Tensor) -> tf.Tensor:
    """x / max(||x||, 1e-12) row-wise, as torch's F.normalize (a true division: tf.math.l2_normalize's rsqrt is
    less exact in float64)."""
    return x / tf.maximum(tf.norm(x, axis=1, keepdims=True), tf.cast(1e-12, x.dtype))


# One tf.function for the module, not one per knn_scores call: a function decorated inside knn_scores was a new
# tf.function object on every call, so every kNN evaluation traced it again (TensorFlow's "triggered tf.function
# retracing" warning from the kNN monitor). The training features, labels and temperature are tensor arguments; k and
# num_classes are Python ints, so only a new k or class count (or dtype) traces again.
@tf.function(reduce_retracing=True)
def _chunk_scores(test, train, labels, temperature, *, k: int, num_classes: int):
    """Class scores of one chunk of test features [b, D] against the unit-norm training features [N_train, D]."""
    similarity = tf.matmul(_unit_rows(test), train, transpose_b=True)  # [b, N_train]
    top_similarity, top_index = tf.math.top_k(similarity, k=k)  # ties: lower train index first
    weights = tf.exp((top_similarity - 1.0) / temperature)
    rows = tf.shape(test)[0]
    segment = tf.range(rows)[:, None] * num_classes + tf.gather(labels, top_index)  # [b, k]: row * C + class
    votes = tf.math.unsorted_segment_sum(tf.reshape(weights, [-1]), tf.reshape(segment, [-1]), rows * num_classes)
    return tf.reshape(votes, [rows, num_classes])


def knn_scores(train_features, train_labels, test_features, *, k: int = DEFAULT_K,
               temperature: float = DEFAULT_TEMPERATURE, num_classes: int | None = None,
               chunk_size: int | None = None) -> np.ndarray:
    """Class scores [N_test, num_classes]: sum over the k nearest training features (cosine) of exp((sim-1)/T).

    Computed in float64 when the features are float64, else float32. `chunk_size` test rows at a time (default:
    as many as keep the similarity matrix near 64 M entries).
    """
    dtype = tf.float64 if np.asarray(train_features).dtype == np.float64 else tf.float32
    train = _unit_rows(tf.convert_to_tensor(train_features, dtype))
    labels = tf.convert_to_tensor(np.asarray(train_labels).reshape(-1), tf.int32)
    test_all = tf.convert_to_tensor(test_features, dtype)
    n_train = int(train.shape[0])
    if n_train == 0 or int(labels.shape[0]) != n_train:
        raise ValueError(f"knn: need training features with one label each, got {n_train} features and "
                         f"{int(labels.shape[0])} labels.")
    if int(test_all.shape[-1]) != int(train.shape[-1]):
        raise ValueError(f"knn: train features have dimension {train.shape[-1]}, test features {test_all.shape[-1]}.")
    if k < 1 or temperature <= 0:
        raise ValueError(f"knn: need k >= 1 and temperature > 0, got k={k}, temperature={temperature}.")
    num_classes = int(num_classes or int(tf.reduce_max(labels)) + 1)
    if int(tf.reduce_min(labels)) < 0 or int(tf.reduce_max(labels)) >= num_classes:
        raise ValueError(f"knn: training labels must lie in [0, {num_classes}), got {int(tf.reduce_min(labels))}.."
                         f"{int(tf.reduce_max(labels))}.")
    k = min(int(k), n_train)
    chunk_size = chunk_size or max(1, min(1024, _SIMILARITY_BUDGET // n_train))
    n_test = int(test_all.shape[0])
    temperature = tf.constant(temperature, dtype)
    parts = [_chunk_scores(test_all[i:i + chunk_size], train, labels, temperature, k=k, num_classes=num_classes)
             .numpy() for i in range(0, n_test, chunk_size)]
    return np.concatenate(parts) if parts else np.zeros([0, num_classes], dtype.as_numpy_dtype)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k: int = DEFAULT_K,
                 temperature: float = DEFAULT_TEMPERATURE, num_classes: int | None = None,
                 chunk_size: int | None = None) -> tuple[float, float]:
    """(top-1, top-5) accuracy, as fractions in [0, 1], of the weighted kNN classifier (see the module docstring).

    `num_classes` defaults to the largest label + 1 (train or test). Top-5 means top-min(5, num_classes).
    """
    test_labels = np.asarray(test_labels).reshape(-1)
    if num_classes is None:
        num_classes = int(max(np.max(train_labels), np.max(test_labels))) + 1
    scores = knn_scores(train_features, train_labels, test_features, k=k, temperature=temperature,
                        num_classes=num_classes, chunk_size=chunk_size)
    # A class no neighbour voted for is never predicted: with fewer voted classes than 5 (a tiny training set), the
    # zero scores would otherwise fill the top 5 by class index and count as hits (top-5 of 100% from one example).
    if len(test_labels) == 0:
        raise ValueError("knn: no test examples.")
    voted = scores[np.arange(len(test_labels)), test_labels] > 0
    return tuple(float(np.mean(hit & voted)) for hit in _topk_hits(scores, test_labels, (1, 5)))


def _topk_hits(scores: np.ndarray, labels: np.ndarray, ks) -> list[np.ndarray]:
    """Per row, whether the label is among the k highest scores (ties towards the lower class, as `top_k`)."""
    ranked = np.argsort(-scores, axis=1, kind="stable")
    return [(ranked[:, :min(k, scores.shape[1])] == labels[:, None]).any(axis=1) for k in ks]
