"""Semi-supervised evaluation: fine-tune the whole encoder with a linear head on 1% or 10% of the labels.

    python -m bt_keras.evaluate.finetune --encoder=runs/cifar10 --dataset=tfds:cifar10 --data_dir=../shared/tfds \
        --subset=0.01 [--epochs=20] [--limit_test=N] [--output=result.json]
    python -m bt_keras.evaluate.finetune --encoder=runs/imagenet --dataset=tfds:imagenet2012_subset/1pct \
        --test_split=validation --data_dir=/data/tensorflow_datasets

The protocol (Zbontar et al. 2021, Sec. 4 "Semi-supervised training on ImageNet"; the official evaluate.py with
`--weights finetune --train-perc 1|10 --epochs 20 --lr-backbone 0.005 --lr-classifier 0.5 --weight-decay 0`):
the encoder and a linear head (weights ~ N(0, 0.01), bias 0) are trained together for 20 epochs, batch 256, SGD
with momentum 0.9, no weight decay, the backbone at learning rate 0.005 and the head at 0.5 (two optimizers, one per
parameter group), both cosine-annealed per epoch; BatchNorm in training mode as `model.train()`; training images
random-resized-cropped and flipped, test images resized and center-cropped. Paper, ImageNet ResNet-50:
1% of labels 55.0 % top-1 / 79.2 % top-5, 10%: 69.7 % / 89.3 %.

Labels: for ImageNet use the standard SimCLR subsets, `tfds:imagenet2012_subset/1pct` or `/10pct`; for any
other dataset `--subset=0.01` (or 0.1) takes a seeded class-balanced fraction of each class of the training split
(`bt_keras.data.labelled_dataset`), or `--subset=N` N examples per class.

The library function, `bt_keras.evaluation.classifiers.finetune`, trains the given Keras encoder IN PLACE.
"""

from __future__ import annotations

import keras
from absl import flags

from bt_keras.cli import evaluate as common
from bt_keras.evaluation import classifiers
from bt_keras.evaluation.protocol import finish, PAPER_IMAGENET


def _paper_reference(dataset: str, subset) -> dict:
    if dataset.startswith("tfds:imagenet2012_subset/"):
        fraction = dataset.rsplit("/", 1)[-1]
        key = {"1pct": "finetune_1pct", "10pct": "finetune_10pct"}.get(fraction.split(":")[0])
    elif dataset.startswith("tfds:imagenet2012") and subset in (0.01, 0.1):
        key = "finetune_1pct" if subset == 0.01 else "finetune_10pct"
    else:
        key = None
    return {"paper_imagenet_resnet50": list(PAPER_IMAGENET[key])} if key else {}


def define_flags(fv=None) -> None:
    fv = flags.FLAGS if fv is None else fv
    common.define_common_flags(fv)
    flags.DEFINE_integer("epochs", classifiers.FINETUNE_EPOCHS, "Epochs (paper: 20).", flag_values=fv)
    flags.DEFINE_float("backbone_lr", classifiers.BACKBONE_LR, "Encoder learning rate (official: 0.005).", flag_values=fv)
    flags.DEFINE_float("head_lr", classifiers.HEAD_LR, "Linear head learning rate (official: 0.5).", flag_values=fv)
    flags.DEFINE_float("weight_decay", classifiers.FINETUNE_WEIGHT_DECAY, "L2 weight decay (official: 0).", flag_values=fv)
    flags.DEFINE_float("momentum", classifiers.MOMENTUM, "SGD momentum.", flag_values=fv)


def run(fv) -> dict:
    """The fine-tuning protocol for parsed flags; returns the result record (also written as JSON)."""
    s = common.setup_from_flags(fv)
    if s.encoder.kind != "keras":
        raise ValueError(f"{s.encoder.path} is a SavedModel export, which is inference-only; fine-tune the Keras "
                         "encoder it was exported from (the training workdir or its encoder.keras).")
    keras.utils.set_random_seed(fv.seed)
    result = classifiers.finetune(s.encoder, s.train_batches(), s.eval_batches(s.test_split, s.limit_test),
                                  s.info.num_classes, epochs=fv.epochs, backbone_lr=fv.backbone_lr,
                                  head_lr=fv.head_lr, weight_decay=fv.weight_decay, momentum=fv.momentum,
                                  seed=fv.seed, verbose=fv.verbose,
                                  train_steps=s.steps(s.train_split, s.limit_train, s.subset),
                                  test_steps=s.steps(s.test_split, s.limit_test))
    settings = {"epochs": fv.epochs, "backbone_lr": fv.backbone_lr, "head_lr": fv.head_lr,
                "weight_decay": fv.weight_decay, "momentum": fv.momentum, "optimizer": "SGD (two parameter groups)",
                "schedule": "cosine per epoch", "train_transform": "random resized crop + flip",
                "test_transform": "resize + center crop"}
    metrics = {"top1": result["top1"], "top5": result["top5"], "class_counts": result["class_counts"],
               "history": result["history"], **_paper_reference(s.dataset, s.subset)}
    subset = f", subset {s.subset}" if s.subset is not None else ""
    return finish(s, "finetune", settings, metrics, result["num_train_examples"], result["num_test_examples"],
                  f"fine-tune ({fv.epochs} epochs{subset})")


main = common.cli_main(run, "bt_keras.evaluate.finetune")


def command() -> None:
    """`python -m bt_keras.evaluate.finetune`."""
    common.run_command(define_flags, main, __name__, __doc__)


if __name__ == "__main__":
    command()
