"""Weighted k-nearest-neighbour accuracy of frozen features (the rule: `bt_keras.evaluation.knn`).

    python -m bt_keras.evaluate.knn --encoder=runs/cifar10 --dataset=tfds:cifar10 --data_dir=../shared/tfds \
        [--k=200] [--temperature=0.1] [--limit_train=N] [--limit_test=N] [--output=result.json]
"""

from __future__ import annotations

from absl import flags

from bt_keras.cli import evaluate as common
from bt_keras.evaluation.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_accuracy
from bt_keras.evaluation.protocol import finish


def define_flags(fv=None) -> None:
    fv = flags.FLAGS if fv is None else fv
    common.define_common_flags(fv)
    flags.DEFINE_integer("k", DEFAULT_K, "Neighbours per test image (Wu et al. 2018: 200).", flag_values=fv)
    flags.DEFINE_float("temperature", DEFAULT_TEMPERATURE, "Vote weight exp(similarity / temperature).",
                       flag_values=fv)


def run(fv) -> dict:
    """The kNN protocol for parsed flags; returns the result record (also written as JSON)."""
    s = common.setup_from_flags(fv)
    train_x, train_y = s.train_features()
    test_x, test_y = s.test_features()
    top1, top5 = knn_accuracy(train_x, train_y, test_x, test_y, k=fv.k, temperature=fv.temperature,
                              num_classes=s.info.num_classes)
    settings = {"k": fv.k, "temperature": fv.temperature, "similarity": "cosine", "weights": "exp(sim / T)"}
    return finish(s, "knn", settings, {"top1": top1, "top5": top5, "feature_dim": int(train_x.shape[1])},
                  len(train_y), len(test_y), f"kNN k={fv.k} T={fv.temperature:g}")


main = common.cli_main(run, "bt_keras.evaluate.knn")


def command() -> None:
    """`python -m bt_keras.evaluate.knn`."""
    common.run_command(define_flags, main, __name__, __doc__)


if __name__ == "__main__":
    command()
