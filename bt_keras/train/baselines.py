"""The end-of-run comparison that says whether pre-training helped: kNN and linear-probe accuracy of the trained
encoder's features next to two baselines, the same network at its random initialisation and the raw pixels.

A kNN number alone does not tell a newcomer much: on an easy dataset raw pixels already score high, and a random
network is often far from chance. So with `config.knn.baselines` (and the kNN monitor on) the run ends with a table
such as

                           kNN top-1 (k=20)  linear top-1  kNN, 1 label/class  kNN, 5 labels/class
    random initialisation             0.512         0.601               0.193                0.287
    raw pixels                        0.350         0.420               0.141                0.184
    Barlow Twins                      0.800         0.850               0.400                0.600

(illustrative numbers) printed and written to `workdir/baselines.json`. The protocols are the library's own: weighted
kNN (`bt_keras.evaluation.knn`, the recipe's k and temperature) and the L-BFGS logistic regression on standardised
features with C chosen on a held-out 20% (`bt_keras.evaluation.classifiers.linear_probe_features`), on the kNN
monitor's splits (`config.knn.train_split` / `test_split`, its example limits). Features are extracted in inference
mode from the evaluation images (no augmentation).

The last two columns are the few-label regime of the paper's semi-supervised claim (what a representation is worth
when labels are scarce): the same weighted kNN with only 1 or 5 labelled training images per class (k = the number
labelled, when fewer than the recipe's k), the mean top-1 over FEW_LABEL_DRAWS seeded draws of those images. The
draws depend only on the labels (`labelled_draws`), so all three rows are scored on the same labelled images.

Raw pixels are those normalised images, area-resized to `config.knn.raw_pixel_size` px when that is set (the
digits' 32 px images are 8 x 8 scans upsampled, so 8 px are their raw pixels) and reduced to one channel when all
channels are equal (grey images): duplicated columns add nothing and slow L-BFGS down.

`BaselineTable` is the callback: the random-initialisation and raw-pixel rows are measured when training starts
from step 0 (the model is then at its initialisation) and kept in `baselines.json`, so a resumed run still has
them; the trained row is measured at the end of training.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from bt_keras import files, paths
from bt_keras.evaluation.classifiers import linear_probe_features
from bt_keras.evaluation.features import inference_function
from bt_keras.evaluation.knn import knn_accuracy

ROWS = ("random initialisation", "raw pixels", "Barlow Twins")
FEW_LABELS = (1, 5)  # labelled training images per class in the few-label columns
FEW_LABEL_DRAWS = 5  # seeded draws of those images, averaged


def labelled_arrays(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(normalised evaluation images float32 [N, S, S, 3], labels [N]) of a labelled stream, in memory."""
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(images), np.concatenate(labels).reshape(-1)


def raw_pixels(images: np.ndarray, size: int = 0) -> np.ndarray:
    """Images [N, S, S, C] as pixel vectors [N, size * size * C'] (area-resized when 0 < size < S; C' = 1 when all
    channels are equal, else C)."""
    x = np.asarray(images, np.float32)
    if size and size < x.shape[1]:
        x = tf.image.resize(x, [size, size], method="area").numpy()
    if x.shape[-1] > 1 and all(np.array_equal(x[..., :1], x[..., i:i + 1]) for i in range(1, x.shape[-1])):
        x = x[..., :1]
    return x.reshape(len(x), -1)


def encoder_features(encoder, images: np.ndarray) -> np.ndarray:
    """The encoder's features of `images`, inference mode, in batches of 256."""
    forward = inference_function(encoder)
    return np.concatenate([tf.cast(forward(tf.constant(images[i:i + 256])), tf.float32).numpy()
                           for i in range(0, len(images), 256)])


def few_label_key(per_class: int) -> str:
    """The baselines.json key of the few-label column with `per_class` labelled images per class."""
    return f"knn_top1_{per_class}_per_class"


def labelled_draws(labels: np.ndarray, per_class: int, draws: int = FEW_LABEL_DRAWS) -> list[np.ndarray]:
    """`draws` sorted index sets of `per_class` examples of every class (all of a class that has fewer), seeded by
    `per_class` and the draw's number only: the same sets for every representation of the same labels."""
    labels = np.asarray(labels).reshape(-1)
    sets = []
    for draw in range(draws):
        rng = np.random.default_rng([per_class, draw])
        sets.append(np.sort(np.concatenate([
            rng.choice(members, size=min(per_class, len(members)), replace=False)
            for members in (np.flatnonzero(labels == label) for label in np.unique(labels))])))
    return sets


def few_label_accuracy(train_x, train_y, test_x, test_y, *, per_class: int, k: int, temperature: float,
                       num_classes: int, draws: int = FEW_LABEL_DRAWS) -> float:
    """Mean kNN top-1 over `draws` draws of `per_class` labelled training examples per class (see the module
    docstring)."""
    train_y = np.asarray(train_y).reshape(-1)
    accuracies = [knn_accuracy(train_x[chosen], train_y[chosen], test_x, test_y, k=min(k, len(chosen)),
                               temperature=temperature, num_classes=num_classes)[0]
                  for chosen in labelled_draws(train_y, per_class, draws)]
    return float(np.mean(accuracies))


def score(train_x, train_y, test_x, test_y, *, k: int, temperature: float, num_classes: int) -> dict:
    """{"knn_top1", "knn_top5", "linear_top1", "linear_top5", and `few_label_key(n)` for n in FEW_LABELS} of one
    feature set (fractions)."""
    knn1, knn5 = knn_accuracy(train_x, train_y, test_x, test_y, k=k, temperature=temperature,
                              num_classes=num_classes)
    with np.errstate(divide="ignore"), warnings.catch_warnings():  # log(0) for classes of probability 0: harmless
        warnings.simplefilter("ignore", RuntimeWarning)
        linear = linear_probe_features(train_x, train_y, test_x, test_y, num_classes=num_classes)
    few = {few_label_key(n): few_label_accuracy(train_x, train_y, test_x, test_y, per_class=n, k=k,
                                                temperature=temperature, num_classes=num_classes)
           for n in FEW_LABELS}
    return {"knn_top1": knn1, "knn_top5": knn5, "linear_top1": linear["top1"], "linear_top5": linear["top5"], **few}


def format_table(rows: list[dict], k: int | None = None) -> str:
    """The rows as a small aligned text table: top-1 of kNN and of the linear probe, then the few-label columns
    that every row has (rows saved by an older version have none)."""
    columns = [(f"kNN top-1 (k={k})" if k else "kNN top-1", "knn_top1"), ("linear top-1", "linear_top1")]
    columns += [(f"kNN, {n} label{'s' if n > 1 else ''}/class", few_label_key(n)) for n in FEW_LABELS
                if all(few_label_key(n) in r for r in rows)]
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'':<{width}}" + "".join(f"  {title:>{max(12, len(title))}}" for title, _ in columns)]
    lines += [f"{r['name']:<{width}}" + "".join(f"  {r[key]:>{max(12, len(title))}.3f}" for title, key in columns)
              for r in rows]
    return "\n".join(lines)


def read(workdir) -> dict | None:
    """The saved comparison ({"step", "rows"}), or None when the run wrote none."""
    path = Path(workdir) / paths.BASELINES_FILE
    return files.read_json(path, "baselines file") if path.exists() else None


class BaselineTable(keras.callbacks.Callback):
    """Measures the ROWS (see the module docstring), prints the table at the end of training and writes it to
    `workdir/baselines.json`."""

    def __init__(self, config, workdir, splits: tuple[tf.data.Dataset, tf.data.Dataset], num_classes: int):
        """`splits`: the kNN monitor's (train, test) labelled streams (`callbacks.labelled_splits`)."""
        super().__init__()
        self.config, self.workdir = config, Path(workdir)
        self.num_classes = num_classes
        self.train, self.test = (labelled_arrays(split) for split in splits)
        self.size = int(config.knn.raw_pixel_size)

    def _row(self, name: str, train_x, test_x) -> dict:
        knn = self.config.knn
        return {"name": name, "features": int(train_x.shape[1]),
                **score(train_x, self.train[1], test_x, self.test[1], k=knn.k, temperature=knn.temperature,
                        num_classes=self.num_classes)}

    def _encoder_row(self, name: str) -> dict:
        encoder = self.model.encoder
        return self._row(name, encoder_features(encoder, self.train[0]), encoder_features(encoder, self.test[0]))

    def _write(self, rows: list[dict], step: int) -> None:
        files.atomic_write_json(self.workdir / paths.BASELINES_FILE, {"step": int(step), "rows": rows})

    def on_train_begin(self, logs=None):
        saved = read(self.workdir) or {}
        if saved.get("rows") or int((logs or {}).get("step", 0)) != 0:
            return  # measured when this run started (or resumed past its initialisation: nothing to measure)
        pixels = f"{ROWS[1]} ({self.size}x{self.size})" if 0 < self.size < self.config.image_size else ROWS[1]
        rows = [self._encoder_row(ROWS[0]),
                self._row(pixels, raw_pixels(self.train[0], self.size), raw_pixels(self.test[0], self.size))]
        self._write(rows, 0)

    def on_train_end(self, logs=None):
        rows = [r for r in (read(self.workdir) or {}).get("rows", []) if r["name"] != ROWS[2]]
        rows.append(self._encoder_row(ROWS[2]))
        step = int(self.model.optimizer.iterations.numpy())
        self._write(rows, step)
        print(format_table(rows, self.config.knn.k), flush=True)
