"""Linear evaluation: a linear classifier on top of the frozen encoder.

    python -m bt_keras.evaluate.linear --encoder=runs/cifar10 --dataset=tfds:cifar10 --data_dir=../shared/tfds \
        [--mode=features|full] [--limit_train=N] [--limit_test=N] [--output=result.json]

`--mode=full`, the paper's protocol (Zbontar et al. 2021, Sec. 4 and Appendix; the official evaluate.py with
`--weights freeze`): the backbone is frozen and runs in inference mode (BatchNorm uses its moving statistics, which
never change); a linear layer (weights ~ N(0, 0.01), bias 0) is trained for 100 epochs with SGD, momentum 0.9,
learning rate 0.3 annealed by a cosine per epoch (torch's CosineAnnealingLR, as there), weight decay 1e-6 added to
the gradient as torch.optim.SGD does (an L2 term, not decoupled), batch 256, cross-entropy. Training images are
random-resized-cropped and flipped, test images resized to image_size / 0.875 and center-cropped (256 -> 224 for
ImageNet). Top-1 / top-5 are measured on the test split after the last epoch. Paper, ImageNet ResNet-50: 73.2 % top-1,
91.0 % top-5. (The official README's released-model log uses --lr-classifier 0.1; evaluate.py's default and the
paper say 0.3.)

`--mode=features`, fast, for small data: features are extracted once (eval transform, no augmentation),
standardised with the training mean / std, and an L2-regularised multinomial logistic regression is fitted with
L-BFGS (scikit-learn). The regularisation C (scikit-learn's: the objective is ||w||^2 / 2 + C * sum of losses) is
chosen among `--C` on a stratified held-out `--val_fraction` of the training split, refitted on the whole training
split and scored on the test split, as in the transfer evaluations of SimCLR (Chen et al. 2020, App. B.8) and BYOL.

The library code: `bt_keras.evaluation.classifiers`.
"""

from __future__ import annotations

from absl import flags

from bt_keras.cli import evaluate as common
from bt_keras.evaluation import classifiers
from bt_keras.evaluation.protocol import finish, PAPER_IMAGENET


def define_flags(fv=None) -> None:
    fv = flags.FLAGS if fv is None else fv
    common.define_common_flags(fv)
    flags.DEFINE_enum("mode", "features", ["features", "full"], "features: L-BFGS on cached features (fast); "
                      "full: the paper's SGD protocol on augmented images.", flag_values=fv)
    flags.DEFINE_integer("epochs", classifiers.LINEAR_EPOCHS, "full: epochs (paper: 100).", flag_values=fv)
    flags.DEFINE_float("lr", classifiers.LINEAR_LR, "full: learning rate (paper: 0.3), cosine-annealed per epoch.",
                       flag_values=fv)
    flags.DEFINE_float("weight_decay", classifiers.LINEAR_WEIGHT_DECAY, "full: L2 weight decay (paper: 1e-6).",
                       flag_values=fv)
    flags.DEFINE_float("momentum", classifiers.MOMENTUM, "full: SGD momentum.", flag_values=fv)
    flags.DEFINE_list("C", [f"{c:g}" for c in classifiers.DEFAULT_CS], "features: inverse L2 strengths to choose from.",
                      flag_values=fv)
    flags.DEFINE_float("val_fraction", 0.2, "features: held-out part of the training split used to choose C.",
                       flag_values=fv)
    flags.DEFINE_integer("max_iter", 1000, "features: L-BFGS iterations.", flag_values=fv)


def run(fv) -> dict:
    """The linear protocol for parsed flags; returns the result record (also written as JSON)."""
    s = common.setup_from_flags(fv)
    full_imagenet = s.dataset.startswith("tfds:imagenet2012") and not s.dataset.startswith("tfds:imagenet2012_subset")
    paper = {"paper_imagenet_resnet50": list(PAPER_IMAGENET["linear"])} if full_imagenet and s.subset is None else {}
    if fv.mode == "features":
        train_x, train_y = s.train_features()
        test_x, test_y = s.test_features()
        result = classifiers.linear_probe_features(train_x, train_y, test_x, test_y, Cs=[float(c) for c in fv.C],
                                                   val_fraction=fv.val_fraction, seed=fv.seed, max_iter=fv.max_iter,
                                                   num_classes=s.info.num_classes, verbose=fv.verbose)
        settings = {"mode": "features", "classifier": "multinomial logistic regression, L-BFGS (scikit-learn)",
                    "standardized": True, "Cs": [float(c) for c in fv.C], "val_fraction": fv.val_fraction,
                    "max_iter": fv.max_iter}
        metrics = {**result, "feature_dim": int(train_x.shape[1])}
        n_train, n_test, title = len(train_y), len(test_y), f"linear (L-BFGS, C={result['C']:g})"
    else:
        result = classifiers.linear_probe(s.encoder, s.train_batches(), s.eval_batches(s.test_split, s.limit_test),
                                          s.info.num_classes, epochs=fv.epochs, lr=fv.lr, weight_decay=fv.weight_decay,
                                          momentum=fv.momentum, seed=fv.seed, verbose=fv.verbose,
                                          train_steps=s.steps(s.train_split, s.limit_train, s.subset),
                                          test_steps=s.steps(s.test_split, s.limit_test))
        settings = {"mode": "full", "epochs": fv.epochs, "lr": fv.lr, "weight_decay": fv.weight_decay,
                    "momentum": fv.momentum, "schedule": "cosine per epoch", "optimizer": "SGD",
                    "train_transform": "random resized crop + flip", "test_transform": "resize + center crop"}
        metrics = {"top1": result["top1"], "top5": result["top5"], "history": result["history"]}
        n_train, n_test, title = result["num_train_examples"], result["num_test_examples"], \
            f"linear (SGD, {fv.epochs} epochs)"
    return finish(s, f"linear_{fv.mode}", settings, {**metrics, **paper}, n_train, n_test, title)


main = common.cli_main(run, "bt_keras.evaluate.linear")


def command() -> None:
    """`python -m bt_keras.evaluate.linear`."""
    common.run_command(define_flags, main, __name__, __doc__)


if __name__ == "__main__":
    command()
