"""Classifiers on an encoder: the linear probes and fine-tuning of the paper (the CLIs: `bt_keras.cli.evaluate_linear`,
`bt_keras.cli.evaluate_finetune`, whose docstrings give the protocols in full).

* `linear_probe_features`: L-BFGS multinomial logistic regression on cached, standardised features, C chosen on a
  held-out part of the training split (small-data practice: SimCLR App. B.8, BYOL).
* `linear_probe`: the paper's protocol: frozen backbone in inference mode, linear head, SGD 0.9, lr 0.3 cosine,
  wd 1e-6, 100 epochs.
* `finetune`: the encoder and a linear head trained together (20 epochs, backbone lr 0.005, head lr 0.5, no wd).
* `train_classifier`: the SGD loop both SGD protocols use.
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from bt_keras.evaluation.features import as_callable, extract_features, topk_accuracy


LINEAR_EPOCHS = 100
LINEAR_LR = 0.3
LINEAR_WEIGHT_DECAY = 1e-6
MOMENTUM = 0.9
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 7))  # 1e-4 ... 100
FINETUNE_EPOCHS = 20
BACKBONE_LR = 0.005
HEAD_LR = 0.5
FINETUNE_WEIGHT_DECAY = 0.0


class _Standardizer:
    """x -> (x - mean) / std with the statistics of the data it was made from (constant features left as 0)."""

    def __init__(self, x: np.ndarray):
        self.mean = x.mean(axis=0)
        std = x.std(axis=0)
        self.std = np.where(std > 1e-6, std, 1.0).astype(x.dtype)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


def _held_out_split(labels: np.ndarray, fraction: float, seed: int):
    """(fit indices, validation indices): stratified when every class has two examples, else a plain shuffle."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    try:
        return train_test_split(index, test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError:  # the validation part is smaller than the number of classes
        return train_test_split(index, test_size=fraction, random_state=seed)


def _fit(x, y, C, max_iter, model=None):
    """A multinomial logistic regression fitted with L-BFGS; returns (model, converged)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if model is None:
        model = LogisticRegression(C=C, max_iter=max_iter, solver="lbfgs", warm_start=True)
    model.set_params(C=C)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    return model, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def _choose_c(x, y, Cs, val_fraction, seed, max_iter, verbose) -> tuple[float, dict]:
    """(best C, {C: held-out accuracy}): each C fitted on the rest of the training split, scored on the held-out
    part. With one C, or too few examples to hold some out, no sweep: that C, or the middle of the list."""
    if len(Cs) == 1:
        return Cs[0], {}
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"linear probe: val_fraction must lie in (0, 1) to choose among {len(Cs)} C values, "
                         f"got {val_fraction}")
    fit, val = _held_out_split(y, val_fraction, seed)
    if len(np.unique(y[fit])) < 2:
        logging.warning("Too few training examples to hold some out for choosing C; using C=%g.", Cs[len(Cs) // 2])
        return Cs[len(Cs) // 2], {}
    scale, model, val_accuracy = _Standardizer(x[fit]), None, {}
    for C in Cs:  # strongest regularisation first; each fit starts from the previous solution
        model, _ = _fit(scale(x[fit]), y[fit], C, max_iter, model)
        val_accuracy[C] = float(np.mean(model.predict(scale(x[val])) == y[val]))
        if verbose:
            print(f"  C={C:g}: held-out accuracy {100 * val_accuracy[C]:.2f} %")
    return max(Cs, key=lambda c: val_accuracy[c]), val_accuracy  # ties: the first, i.e. the most regularised


def linear_probe_features(train_features, train_labels, test_features, test_labels, *, Cs=DEFAULT_CS,
                          val_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000,
                          num_classes: int | None = None, verbose: int = 0) -> dict:
    """The fast linear probe on cached features (see the module docstring).

    Returns `{"top1", "top5", "C", "val_accuracy": {C: accuracy}, "converged"}`; accuracies are fractions.
    With a single C there is no sweep and no held-out part.
    """
    x = np.asarray(train_features, np.float32)
    y = np.asarray(train_labels).reshape(-1).astype(np.int64)
    x_test = np.asarray(test_features, np.float32)
    y_test = np.asarray(test_labels).reshape(-1).astype(np.int64)
    num_classes = int(num_classes or max(y.max(), y_test.max()) + 1)
    Cs = sorted({float(c) for c in Cs})
    if not Cs or min(Cs) <= 0:
        raise ValueError(f"linear probe: C values must be positive, got {Cs}")
    if len(np.unique(y)) < 2:
        raise ValueError("linear probe: the training features hold a single class; a classifier needs two or more.")
    best, val_accuracy = _choose_c(x, y, Cs, val_fraction, seed, max_iter, verbose)
    scale = _Standardizer(x)
    model, converged = _fit(scale(x), y, best, max_iter)
    if not converged:
        logging.warning("L-BFGS did not converge in %d iterations (C=%g); raise --max_iter.", max_iter, best)
    scores = np.full([len(y_test), num_classes], -np.inf, np.float64)  # classes unseen in training never rank
    scores[:, model.classes_] = model.predict_log_proba(scale(x_test))
    top1, top5 = topk_accuracy(scores, y_test, (1, 5))
    return {"top1": top1, "top5": top5, "C": best, "val_accuracy": {f"{c:g}": a for c, a in val_accuracy.items()},
            "converged": converged}


def make_head(feature_dim: int, num_classes: int, seed: int = 0) -> keras.layers.Dense:
    """The linear classifier, initialised as the official code: weights ~ N(0, 0.01), bias 0."""
    head = keras.layers.Dense(num_classes, kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01, seed=seed),
                              bias_initializer="zeros", name="linear_head")
    head.build((None, feature_dim))
    return head


def cosine_factor(epoch: int, epochs: int) -> float:
    """torch.optim.lr_scheduler.CosineAnnealingLR(T_max=epochs), stepped once per epoch: lr_e = lr * this."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def train_classifier(encoder, head, train_data, *, epochs: int, head_lr: float, backbone_lr: float | None = None,
                     weight_decay: float = 0.0, momentum: float = MOMENTUM, steps_per_epoch: int | None = None,
                     verbose: int = 0) -> dict:
    """Minimises the cross-entropy of head(encoder(images)) with SGD + momentum, lr cosine-annealed per epoch.

    `backbone_lr=None`: the encoder is frozen: run in inference mode (BatchNorm uses and keeps its moving
    statistics), never differentiated, never updated (linear evaluation). Otherwise it is trained in training mode
    with its own SGD optimizer and learning rate (fine-tuning, the official code's two parameter groups): two
    Keras optimizers, each applying its part of one gradient. `weight_decay` adds weight_decay/2 * ||w||^2 of the
    trained variables to the loss, i.e. weight_decay * w to the gradient, as torch.optim.SGD's weight_decay.

    `train_data`: a tf.data.Dataset of (images, labels) batches iterated once per epoch, or a function
    epoch -> such a dataset; `steps_per_epoch`, if known, sizes the first epoch's progress bar. Returns
    `{"history": [per-epoch loss, lr, examples], "num_train_examples", "class_counts"}` (counts of the first
    epoch).
    """
    model = as_callable(encoder)
    frozen = backbone_lr is None
    if not frozen and not isinstance(model, keras.Model):
        raise ValueError("Fine-tuning needs the Keras encoder (a training workdir, encoder.keras or checkpoint); "
                         "a SavedModel export is inference-only.")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    groups = [(list(head.trainable_variables), head_lr)]
    if not frozen:
        groups.append((list(model.trainable_variables), backbone_lr))
    optimizers = []
    for variables, lr in groups:
        optimizer = keras.optimizers.SGD(learning_rate=lr, momentum=momentum)
        optimizer.build(variables)
        optimizers.append(optimizer)
    variables = [v for group, _ in groups for v in group]
    sizes = [len(group) for group, _ in groups]

    @tf.function(reduce_retracing=True, autograph=False)  # Python flags only: nothing for AutoGraph to rewrite
    def step(images, labels):
        with tf.GradientTape() as tape:
            features = model(images, training=not frozen)
            if frozen:
                features = tf.stop_gradient(features)
            logits = head(tf.cast(features, tf.float32))
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
            total = loss
            if weight_decay:
                total += 0.5 * weight_decay * tf.add_n([tf.reduce_sum(tf.square(v)) for v in variables])
        grads = tape.gradient(total, variables)
        start = 0
        for optimizer, size in zip(optimizers, sizes):
            optimizer.apply(grads[start:start + size], variables[start:start + size])
            start += size
        return loss

    num_classes = int(head.units)
    history, counts = [], np.zeros(num_classes, np.int64)
    for epoch in range(epochs):
        factor = cosine_factor(epoch, epochs)
        for optimizer, (_, lr) in zip(optimizers, groups):
            optimizer.learning_rate = lr * factor
        dataset = train_data(epoch) if callable(train_data) else train_data
        if verbose:
            print(f"Epoch {epoch + 1}/{epochs}")
        progbar = keras.utils.Progbar(steps_per_epoch, verbose=verbose, unit_name="step") if verbose else None
        loss_sum, examples, steps = 0.0, 0, 0
        for images, labels in dataset:
            loss = float(step(images, labels))
            n = int(labels.shape[0])
            loss_sum, examples, steps = loss_sum + loss * n, examples + n, steps + 1
            if epoch == 0:
                counts += np.bincount(np.asarray(labels), minlength=num_classes)[:num_classes]
            if progbar:
                progbar.update(steps, [("loss", loss)])
        if progbar and progbar.target is None:  # a known target finalises itself
            progbar.update(steps, finalize=True)
        if examples == 0:
            raise ValueError("The training set is empty: no batches in an epoch. Check --train_split, --subset and "
                             "--limit_train.")
        if epoch == 0 and (counts == 0).any():
            logging.warning("The training set has no examples of %d of the %d classes (e.g. class %d).",
                            int((counts == 0).sum()), num_classes, int(np.flatnonzero(counts == 0)[0]))
        steps_per_epoch = steps
        history.append({"epoch": epoch + 1, "loss": loss_sum / examples, "lr_head": head_lr * factor,
                        **({} if frozen else {"lr_backbone": backbone_lr * factor}), "examples": examples})
    return {"history": history, "num_train_examples": history[0]["examples"], "class_counts": counts.tolist()}


def evaluate_classifier(encoder, head, dataset, *, steps: int | None = None,
                        verbose: int = 0) -> tuple[float, float, int]:
    """(top-1, top-5, number of examples) of head(encoder(images)) with the encoder in inference mode."""
    model = as_callable(encoder)

    def classify(images, training=False):
        return head(tf.cast(model(images, training=False), tf.float32))

    logits, labels = extract_features(classify, dataset, verbose=verbose, description="test predictions",
                                             steps=steps)
    top1, top5 = topk_accuracy(logits, labels, (1, 5))
    return top1, top5, len(labels)


def linear_probe(encoder, train_data, test_data, num_classes: int, *, epochs: int = LINEAR_EPOCHS,
                 lr: float = LINEAR_LR, weight_decay: float = LINEAR_WEIGHT_DECAY, momentum: float = MOMENTUM,
                 seed: int = 0, train_steps: int | None = None, test_steps: int | None = None,
                 verbose: int = 0) -> dict:
    """The paper's linear evaluation (full mode): trains a linear head on the frozen encoder, scores the test data.

    `train_data` as `train_classifier` takes it; `train_steps` / `test_steps` (batches per pass, if known) only
    size the progress bars.

    Returns `{"top1", "top5", "num_test_examples", "num_train_examples", "history", "head"}`.
    """
    model = as_callable(encoder)
    head = make_head(int(model.output_shape[-1]), num_classes, seed)
    trained = train_classifier(model, head, train_data, epochs=epochs, head_lr=lr, backbone_lr=None,
                               weight_decay=weight_decay, momentum=momentum, steps_per_epoch=train_steps,
                               verbose=verbose)
    top1, top5, n_test = evaluate_classifier(model, head, test_data, steps=test_steps, verbose=verbose)
    return {"top1": top1, "top5": top5, "num_test_examples": n_test, "num_train_examples":
            trained["num_train_examples"], "history": trained["history"], "head": head}


def finetune(encoder, train_data, test_data, num_classes: int, *, epochs: int = FINETUNE_EPOCHS,
             backbone_lr: float = BACKBONE_LR, head_lr: float = HEAD_LR,
             weight_decay: float = FINETUNE_WEIGHT_DECAY,
             momentum: float = MOMENTUM, seed: int = 0, train_steps: int | None = None,
             test_steps: int | None = None, verbose: int = 0) -> dict:
    """Fine-tunes `encoder` (a Keras model, changed in place) with a new linear head; scores the test data.

    `train_data`: (images, labels) batches, a tf.data.Dataset iterated once per epoch or a function epoch ->
    dataset (see `preprocessing.training_batches`); `train_steps` / `test_steps` only size the progress bars.
    Returns `{"top1", "top5", "num_test_examples", "num_train_examples", "class_counts", "history", "head"}`;
    accuracies are fractions.
    """
    model = as_callable(encoder)
    if not isinstance(model, keras.Model):
        raise ValueError("Fine-tuning needs the Keras encoder (a training workdir, encoder.keras or checkpoint); a "
                         "SavedModel export is inference-only. Evaluate it with knn or linear instead.")
    head = make_head(int(model.output_shape[-1]), num_classes, seed)
    trained = train_classifier(model, head, train_data, epochs=epochs, head_lr=head_lr,
                                      backbone_lr=backbone_lr, weight_decay=weight_decay, momentum=momentum,
                                      steps_per_epoch=train_steps, verbose=verbose)
    top1, top5, n_test = evaluate_classifier(model, head, test_data, steps=test_steps, verbose=verbose)
    return {"top1": top1, "top5": top5, "num_test_examples": n_test, "head": head, **trained}
