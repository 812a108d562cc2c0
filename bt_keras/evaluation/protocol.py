"""What an evaluation run checks and records: `setup` opens the encoder and the dataset and checks that they fit
together (clear errors otherwise); `finish` writes the result as JSON and prints a one-row table.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf
from absl import logging

from bt_keras import __version__, files, paths
from bt_keras.assembly import artifacts
from bt_keras.assembly.artifacts import Encoder
from bt_keras.data import sources
from bt_keras.data.sources import DatasetInfo
from bt_keras.evaluation.features import check_labels, extract_features
from bt_keras.evaluation.preprocessing import (Preprocessing, labelled_batches, resolve_preprocessing,
                                               training_batches)


def check_labelled(info: DatasetInfo) -> None:
    """kNN, linear probes and fine-tuning all need class labels."""
    if not info.num_classes:
        raise ValueError(f"{info.name} has no labels (no 'label' feature): kNN, linear and fine-tuning evaluation "
                         "need a labelled dataset, e.g. tfds:cifar10, tfds:imagenet2012, a folder:PATH of class "
                         "sub-folders, digits or cluttered_digits. Pre-train on unlabelled data, then evaluate on a "
                         "labelled one.")


def check_split(info: DatasetInfo, split: str) -> None:
    if split not in info.splits:
        raise ValueError(f"{info.name} has no split {split!r}; its splits are {sorted(info.splits)}.")


def default_test_split(info: DatasetInfo) -> str:
    """`test` when the dataset has one, else `validation` / `val` (ImageNet's held-out split)."""
    for split in ("test", "validation", "val"):
        if split in info.splits:
            return split
    raise ValueError(f"{info.name} has no test/validation split (splits: {sorted(info.splits)}); pass --test_split.")


def parse_subset(text):
    """`--subset` as data.labelled_dataset takes it: '0.01' -> a fraction of each class, '5' -> 5 per class."""
    if text in (None, "", "none", "None"):
        return None
    if isinstance(text, (int, float)):
        return text
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--subset must be a fraction such as 0.01 or a per-class count such as 5, got "
                             f"{text!r}") from None


def check_subset_size(subset, info: DatasetInfo, split: str) -> None:
    """Refuses a fraction so small that an average class of `split` would keep round(fraction x size) = 0 examples.

    (`data.labelled_dataset` would quietly keep one example per class instead, which is not what was asked.)
    """
    if subset is None:
        return
    try:
        sources.check_subset(subset)
    except ValueError as error:
        raise ValueError(f"--{error}") from None
    if isinstance(subset, float):
        per_class = info.splits[split] / max(1, info.num_classes)
        if subset * per_class < 0.5:
            smallest = 0.5 / per_class
            raise ValueError(
                f"--subset={subset} keeps {subset} x ~{per_class:.0f} = {subset * per_class:.2g} examples of an "
                f"average class of {info.name} {split!r} ({info.splits[split]} examples, {info.num_classes} "
                f"classes): classes would be empty. Use --subset >= {_round_up(smallest)} (at least one example "
                "per class), or a per-class count such as --subset=1.")


def _round_up(x: float) -> str:
    digits = max(0, -math.floor(math.log10(x)) + 1)
    return f"{math.ceil(x * 10 ** digits) / 10 ** digits:g}"


@dataclasses.dataclass
class Setup:
    """Everything a protocol needs, checked: the encoder, the dataset and how to feed one to the other."""

    encoder: Encoder
    dataset: str
    info: DatasetInfo
    prep: Preprocessing
    train_split: str
    test_split: str
    batch_size: int
    data_dir: str | None
    download: bool
    subset: Any
    limit_train: int
    limit_test: int
    seed: int
    output: str | None
    verbose: int
    started: float

    def eval_batches(self, split: str, limit: int | None = None, subset=None) -> tf.data.Dataset:
        return labelled_batches(self.dataset, split, self.prep, self.info, batch_size=self.batch_size,
                                data_dir=self.data_dir, download=self.download, subset=subset, limit=limit,
                                seed=self.seed)

    def steps(self, split: str, limit: int = 0, subset=None) -> int | None:
        """Batches in a pass over `split` (None when a subset makes it unknown in advance)."""
        if subset is not None:
            return None
        examples = min(limit, self.info.splits[split]) if limit else self.info.splits[split]
        return max(1, math.ceil(examples / self.batch_size))

    def train_features(self):
        ds = self.eval_batches(self.train_split, self.limit_train, self.subset)
        x, y = extract_features(self.encoder, ds, verbose=self.verbose, description=f"{self.train_split} features",
                                steps=self.steps(self.train_split, self.limit_train, self.subset))
        check_labels(y, self.info.num_classes, f"{self.dataset} {self.train_split!r}")
        return x, y

    def test_features(self):
        ds = self.eval_batches(self.test_split, self.limit_test)
        x, y = extract_features(self.encoder, ds, verbose=self.verbose, description=f"{self.test_split} features",
                                steps=self.steps(self.test_split, self.limit_test))
        check_labels(y, self.info.num_classes, f"{self.dataset} {self.test_split!r}")
        return x, y

    def train_batches(self):
        return training_batches(self.dataset, self.train_split, self.prep, self.info, batch_size=self.batch_size,
                                data_dir=self.data_dir, download=self.download, subset=self.subset,
                                limit=self.limit_train, seed=self.seed)


def setup(encoder_path, *, dataset=None, data_dir=None, download=False, train_split="train", test_split=None,
          image_size=None, mean=None, std=None, batch_size=256, limit_train=0, limit_test=0, subset=None, seed=0,
          output=None, verbose=1) -> Setup:
    """Opens the encoder and the dataset and checks that they fit together (clear errors otherwise)."""
    started = time.time()
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    for name, value in (("limit_train", limit_train), ("limit_test", limit_test)):
        if value is not None and value < 0:
            raise ValueError(f"--{name} must be >= 0 (0: no limit), got {value}")
    encoder = artifacts.open_encoder(encoder_path)
    dataset = dataset or encoder.metadata.get("dataset")
    if not dataset:
        raise ValueError(f"The encoder's metadata does not name its dataset; pass --dataset ({sources.NAME_FORMS}).")
    info = sources.dataset_info(dataset, data_dir, download)
    check_labelled(info)
    test_split = test_split or default_test_split(info)
    for split in (train_split, test_split):
        check_split(info, split)
    subset = parse_subset(subset)
    check_subset_size(subset, info, train_split)
    prep = resolve_preprocessing(encoder, info, image_size, mean, std)
    return Setup(encoder, dataset, info, prep, train_split, test_split, batch_size, data_dir, download, subset,
                 limit_train or 0, limit_test or 0, seed, output, verbose, started)


PAPER_IMAGENET = {"linear": (73.2, 91.0), "finetune_1pct": (55.0, 79.2), "finetune_10pct": (69.7, 89.3)}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def default_output_path(encoder: Encoder, protocol: str, dataset: str) -> Path:
    """`eval_<protocol>_<dataset>.json` beside the encoder (the workdir, the .keras file's folder, or the workdir of
    a checkpoint, with `_step<N>` added), or in the current directory for a SavedModel or an unwritable folder."""
    name = f"eval_{_slug(protocol)}_{_slug(dataset)}"
    path = encoder.path
    if encoder.kind == "savedmodel":
        folder = Path.cwd()
    elif paths.is_checkpoint(path):  # workdir/checkpoints/ckpt-N
        folder, name = path.parent.parent, f"{name}_step{path.name.rsplit('-', 1)[-1]}"
    else:
        folder = path if path.is_dir() else path.parent
    if not _writable(folder):
        logging.warning("%s is not writable; writing the result to the current directory.", folder)
        folder = Path.cwd()
    return folder / f"{name}.json"


def _writable(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK)


def finish(s: Setup, protocol: str, settings: dict, metrics: dict, num_train: int, num_test: int,
           title: str) -> dict:
    """Builds the result record, writes it as JSON (atomically), prints its one-row table, and returns it."""
    record = {
        "protocol": protocol,
        "dataset": s.dataset,
        "split": s.test_split,
        "train_split": s.train_split,
        "encoder": s.encoder.describe(),
        "preprocessing": s.prep.to_dict(),
        "settings": {**settings, "batch_size": s.batch_size, "subset": s.subset, "limit_train": s.limit_train,
                     "limit_test": s.limit_test, "seed": s.seed},
        "num_classes": s.info.num_classes,
        "num_train_examples": int(num_train),
        "num_test_examples": int(num_test),
        **metrics,
        "time_seconds": round(time.time() - s.started, 2),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "bt_keras": __version__},
    }
    name = protocol if s.subset is None else f"{protocol}_subset{s.subset}"
    output = Path(s.output) if s.output else default_output_path(s.encoder, name, s.dataset)
    files.atomic_write_json(output, record)
    record["output"] = str(output)
    print(format_table(record, title))
    print(f"Wrote {output}")
    return record


def format_table(record: dict, title: str) -> str:
    """A one-row Markdown table of a result (pastes into RESULTS.md); accuracies in percent."""
    encoder = record["encoder"]
    step = f" (step {encoder['step']})" if encoder.get("step") is not None else ""
    header = ["protocol", "encoder", "dataset", "train", "test", "top-1 %", "top-5 %", "time"]
    row = [title, f"{encoder['path']}{step}", f"{record['dataset']} {record['train_split']}->{record['split']}",
           str(record["num_train_examples"]), str(record["num_test_examples"]), f"{100 * record['top1']:.2f}",
           f"{100 * record['top5']:.2f}", f"{record['time_seconds']:.0f} s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(row) + " |"]
    paper = record.get("paper_imagenet_resnet50")
    if paper:
        lines.append(f"(paper, ImageNet ResNet-50: top-1 {paper[0]} %, top-5 {paper[1]} %)")
    return "\n".join(lines)
