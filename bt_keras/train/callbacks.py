"""Keras callbacks that let a researcher watch Barlow Twins train: logs, TensorBoard, C itself, and kNN accuracy.

They work with `model.fit` and with `bt_keras.cli.train`'s loop alike:

* `MetricsLogger`: every logged step and epoch as a JSON line (`metrics.jsonl`) and as TensorBoard scalars: every
  numeric metric in the logs (loss, on/off-diagonal terms, learning rate, embedding std, images/s, kNN accuracy, ...).
* `CrossCorrelationPicture`: the cross-correlation matrix C of a fixed batch, as a TensorBoard image and a PNG with
  a colour bar (and the C drawn, as .npy). Red is +1, blue -1, white 0: training should turn it into a red diagonal.
* `TrainingReport`: the report figure (`bt_keras.train.figures`) at the end of training.
* `KnnMonitor`: weighted kNN accuracy (k=200, temperature 0.1, as in Wu et al. 2018 and most SSL papers) of the
  encoder's features on a labelled split, every few epochs.
* `OnlineProbeMonitor`: the online linear probe's (`bt_keras.method.probe`) top-1 on a labelled split, every few epochs:
  the number solo-learn reports for its CIFAR recipe.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from bt_keras import paths
from bt_keras.data import labelled, pretrain
from bt_keras.evaluation.features import extract_features
from bt_keras.evaluation.knn import knn_accuracy
from bt_keras.train import baselines, figures, progress

def numeric_logs(logs: dict | None) -> dict[str, float]:
    """The numeric entries of Keras logs (floats, ints, NumPy and TensorFlow scalars) as Python floats."""
    values = {}
    for name, value in (logs or {}).items():
        if isinstance(value, bool) or name in ("step", "epoch"):
            continue
        try:
            array = np.asarray(value)
        except (TypeError, ValueError):
            continue
        if array.shape == () and np.issubdtype(array.dtype, np.number):
            values[name] = float(array)
    return values


class MetricsLogger(keras.callbacks.Callback):
    """Appends logs to `workdir/metrics.jsonl` and writes them as TensorBoard scalars under `workdir/tensorboard`.

    Every numeric metric the model (or another callback) puts in the logs is recorded. Batch logs are written every
    `every_steps` steps, read from the logs' `step` (the global step; the batch index when absent); only those
    steps are read back from the device, so the logger adds no per-step host round trip (`async_safe`).
    """

    async_safe = True  # reads the (possibly still running) step's tensors only on the steps it writes

    def __init__(self, workdir, every_steps: int = 1):
        super().__init__()
        if every_steps < 1:
            raise ValueError(f"MetricsLogger: every_steps must be >= 1, got {every_steps}.")
        self.path = Path(workdir) / paths.METRICS_FILE
        self.every_steps = int(every_steps)
        self.writer = tf.summary.create_file_writer(str(Path(workdir) / paths.TENSORBOARD_DIR))

    def _write(self, kind: str, step: int, logs: dict) -> None:
        values = numeric_logs(logs)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "step": int(step), "time": round(time.time(), 3),
                                **{k: round(v, 6) for k, v in values.items()}}) + "\n")
        with self.writer.as_default(step=int(step)):
            for name, value in values.items():
                tf.summary.scalar(f"{kind}/{name.replace('/', '_per_')}", value)
        self.writer.flush()

    def on_train_begin(self, logs=None):
        logs = logs or {}
        self._write("start", logs.get("step", 0), logs)

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        step = int(logs.get("step", batch))
        if step % self.every_steps == 0:
            self._write("train", step, logs)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self._write("epoch", logs.get("step", epoch + 1), {**logs})


def correlation_image(c: np.ndarray, max_size: int = 256) -> np.ndarray:
    """uint8 RGB picture of C (its top-left `max_size` block when larger): red +1, white 0, blue -1."""
    c = np.clip(np.asarray(c, np.float32)[:max_size, :max_size], -1.0, 1.0)
    positive, negative = np.clip(c, 0, 1), np.clip(-c, 0, 1)
    rgb = np.stack([1 - negative, 1 - positive - negative, 1 - positive], axis=-1)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


class CrossCorrelationPicture(keras.callbacks.Callback):
    """Draws C for a fixed batch of view pairs every `every_epochs` epochs (TensorBoard image + latest PNG)."""

    def __init__(self, views: tuple, workdir, every_epochs: int = 1):
        super().__init__()
        self.views = views
        self.workdir = Path(workdir)
        self.every_epochs = every_epochs
        self.writer = tf.summary.create_file_writer(str(self.workdir / paths.TENSORBOARD_DIR))

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_epochs:
            return
        c = self.model.compute_loss_terms(*self.views, training=False)["cross_correlation"].numpy()
        step = int((logs or {}).get("step", epoch + 1))
        figures.save_correlation(self.workdir, c, step)  # the C drawn, for the report and for tests
        try:
            picture = figures.correlation_picture(c, step=step)  # axes, title and colour bar
        except ImportError:  # no matplotlib: the bare picture
            picture = correlation_image(c, figures.MAX_SHOWN)
        with self.writer.as_default(step=step):
            tf.summary.image("cross_correlation", picture[None], max_outputs=1)
        self.writer.flush()
        keras.utils.save_img(self.workdir / paths.CORRELATION_PICTURE, picture, scale=False)


class KnnMonitor(keras.callbacks.Callback):
    """Weighted kNN top-1/top-5 of the encoder's features every `every_epochs` epochs; adds `knn_top1`/`knn_top5`
    to the epoch's logs (so MetricsLogger, placed after it, records them) and to `history`."""

    def __init__(self, train_data: tf.data.Dataset, test_data: tf.data.Dataset, num_classes: int,
                 every_epochs: int = 1, k: int = 200, temperature: float = 0.1):
        super().__init__()
        self.train_data, self.test_data = train_data, test_data
        self.num_classes, self.every_epochs, self.k, self.temperature = num_classes, every_epochs, k, temperature
        self.history = []
        self.print_epochs = True  # False when a progress line shows the accuracy (bt_keras.train.progress)

    def evaluate(self, encoder) -> tuple[float, float]:
        train_x, train_y = extract_features(encoder, self.train_data)
        test_x, test_y = extract_features(encoder, self.test_data)
        return knn_accuracy(train_x, train_y, test_x, test_y, k=self.k, temperature=self.temperature,
                            num_classes=self.num_classes)

    def on_train_begin(self, logs=None):
        if not self.history:  # the starting point (random initialisation, or the resumed encoder)
            top1, top5 = self.evaluate(self.model.encoder)
            self.history.append({"step": int((logs or {}).get("step", 0)), "knn_top1": top1, "knn_top5": top5})
            if logs is not None:
                logs.update(knn_top1=top1, knn_top5=top5)
            print(f"kNN at the start: top-1 {top1:.4f}  top-5 {top5:.4f}", flush=True)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or (epoch + 1) % self.every_epochs:
            return
        top1, top5 = self.evaluate(self.model.encoder)
        logs.update(knn_top1=top1, knn_top5=top5)
        self.history.append({"step": int(logs.get("step", 0)), "knn_top1": top1, "knn_top5": top5})
        if self.print_epochs:
            print(f"\nepoch {epoch + 1}: kNN top-1 {top1:.4f}  top-5 {top5:.4f}", flush=True)


class OnlineProbeMonitor(keras.callbacks.Callback):
    """Top-1 of the model's online probe on `test_data` ((images, labels) batches; encoder in inference mode) every
    `every_epochs` epochs; adds `online_val_top1` to the epoch's logs (solo-learn's `val_acc1`)."""

    def __init__(self, test_data: tf.data.Dataset, every_epochs: int = 1, split_name: str = "the test split"):
        super().__init__()
        if every_epochs < 1:
            raise ValueError(f"OnlineProbeMonitor: every_epochs must be >= 1, got {every_epochs}.")
        self.test_data, self.every_epochs, self.split_name = test_data, every_epochs, split_name

    def evaluate(self) -> float:
        features, labels = extract_features(self.model.encoder, self.test_data)
        logits = self.model.online_probe(features).numpy()
        return float(np.mean(np.argmax(logits, axis=-1) == labels))

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or (epoch + 1) % self.every_epochs or self.model.online_probe is None:
            return
        logs["online_val_top1"] = top1 = self.evaluate()
        print(f"\nepoch {epoch + 1}: online probe top-1 on {self.split_name} {top1:.4f}", flush=True)


def knn_monitored(config, info) -> bool:
    """Whether the run has a kNN monitor (and the baseline table, if `config.knn.baselines`): `knn.every_epochs` set
    and the dataset labelled."""
    return bool(config.knn.every_epochs and info.num_classes)


def labelled_splits(config, info) -> tuple[tf.data.Dataset, tf.data.Dataset] | None:
    """The kNN monitor's (train, test) labelled streams of `config.knn`, built once for the monitor and the baseline
    table (None when the monitor is off or the dataset has no labels)."""
    knn = config.knn
    if not knn_monitored(config, info):
        if knn.every_epochs:
            logging.warning("kNN monitor disabled: %s has no labels.", config.dataset)
        return None

    def split(name, limit):
        ds = labelled.labelled_dataset(config.dataset, split=name, batch_size=256, image_size=config.image_size,
                                       data_dir=config.data_dir, download=config.download, shuffle=False)
        return ds.unbatch().take(limit).batch(256) if limit else ds

    return split(knn.train_split, knn.train_examples), split(knn.test_split, knn.test_examples)


def online_probe_monitor_from_config(config, run) -> OnlineProbeMonitor | None:
    """An OnlineProbeMonitor on `config.online_probe.eval_split` (None unless the run has a probe and
    `eval_every_epochs` > 0)."""
    probe = config.online_probe
    if not run.probe_classes or not probe.eval_every_epochs:
        return None  # (the builder has already said when the dataset has no labels)
    ds = labelled.labelled_dataset(config.dataset, split=probe.eval_split, batch_size=256,
                                   image_size=config.image_size, data_dir=config.data_dir, download=config.download,
                                   shuffle=False)
    if probe.eval_examples:
        ds = ds.unbatch().take(probe.eval_examples).batch(256)
    return OnlineProbeMonitor(ds, every_epochs=probe.eval_every_epochs,
                              split_name=f"split {probe.eval_split!r} (online_val_top1)")


class TrainingReport(keras.callbacks.Callback):
    """Writes `workdir/report.png` (bt_keras.train.figures) when training ends; a warning, not a failure, if it
    cannot."""

    def __init__(self, workdir):
        super().__init__()
        self.workdir = Path(workdir)

    def on_train_end(self, logs=None):
        try:
            path = figures.write_report(self.workdir)
        except (ImportError, OSError, ValueError) as error:
            logging.warning("No training report: %s", error)
            return
        print(f"Report: {path}", flush=True)


def default_callbacks(config, workdir, run, enabled: bool = True) -> list[keras.callbacks.Callback]:
    """What `bt_keras.cli.train` attaches: kNN and online-probe monitors (if configured), the baseline table (if
    configured), C picture, the progress line, the logger (after those, so it sees their additions to the logs), the
    report (last: it reads what the others wrote). `run`: the run's dataset facts (`builders.RunData`). Empty on
    non-chief workers."""
    if not enabled:
        return []
    splits, knn = labelled_splits(config, run.info), config.knn
    monitor = table = None
    if splits is not None:
        monitor = KnnMonitor(*splits, run.info.num_classes, every_epochs=knn.every_epochs, k=knn.k,
                             temperature=knn.temperature)
        monitor.print_epochs = False  # the progress line shows it
        table = baselines.BaselineTable(config, workdir, splits, run.info.num_classes) if knn.baselines else None
    result = [monitor, online_probe_monitor_from_config(config, run), table,
              correlation_picture_from_config(config, run, workdir),
              progress.ProgressLines(config.epochs, run.steps_per_epoch),
              MetricsLogger(workdir, every_steps=config.log_every_steps),
              TrainingReport(workdir) if config.report else None]
    return [cb for cb in result if cb is not None]


def correlation_picture_from_config(config, run, workdir) -> CrossCorrelationPicture | None:
    """The picture of C every `config.picture_every_epochs` epochs, on a fixed batch of view pairs drawn with the
    run's views and seed + 1; None when that is 0 (then no fixed batch is built either)."""
    if not config.picture_every_epochs:
        return None
    fixed = pretrain.pretrain_dataset(config.dataset, global_batch_size=min(config.batch_size, 256), views=run.views,
                                      data_dir=config.data_dir, download=config.download, split=config.split,
                                      seed=config.seed + 1, repeat=False, cache=False, shuffle_buffer=1024)
    return CrossCorrelationPicture(next(iter(fixed)), workdir, every_epochs=config.picture_every_epochs)


# ------------------------------------------------------------------ a finished run, started again (Trainer.run)


def _trained_row(workdir, step: int) -> dict | None:
    """The baseline table's trained-encoder row if `workdir/baselines.json` holds it for `step`, else None (also when
    the file is unreadable: the loop then measures the table again, and says what is wrong with the file)."""
    try:
        saved = baselines.read(workdir) or {}
    except ValueError:
        return None
    if not isinstance(saved, dict) or saved.get("step") != step or not isinstance(saved.get("rows"), list):
        return None
    rows = saved["rows"]
    return next((row for row in rows if isinstance(row, dict) and row.get("name") == baselines.ROWS[2]), None)


def end_of_run_files(config, run) -> list[str]:
    """The files `default_callbacks` write when training ends: report.png (`config.report`) and baselines.json
    (`config.knn.baselines`, with the kNN monitor on). `run`: the run's dataset facts (`builders.RunData`)."""
    names = [paths.REPORT_PICTURE] if config.report else []
    if config.knn.baselines and knn_monitored(config, run.info):
        names.append(paths.BASELINES_FILE)
    return names


def end_of_run_written(config, workdir, run, step: int) -> bool:
    """Whether `workdir` holds what `default_callbacks` write when training ends at `step`, the last step of a
    finished run: the `end_of_run_files`, the baseline table with its trained row of `step`. What they write at
    epoch ends (metrics, picture of C) was written before the checkpoint of `step`."""
    names = end_of_run_files(config, run)
    if not all((Path(workdir) / name).is_file() for name in names):
        return False
    return paths.BASELINES_FILE not in names or _trained_row(workdir, step) is not None


def final_knn(config, records: list[dict], workdir, run, step: int) -> dict | None:
    """The kNN monitor's top-1/top-5 of the encoder at `step` (a finished run's last), from what the run wrote: {}
    when there is no monitor; the metrics' record of `step` (`records`: `figures.read_metrics(workdir)`) when the
    last epoch measured it; else the baseline table's trained row of `step` (the same splits, k, temperature and
    features: the same numbers), rounded as the metrics are. None when neither holds it (then a rerun measures it,
    as the monitor does at every start)."""
    if not knn_monitored(config, run.info):
        return {}
    measured = [r for r in records if r["step"] == step and "knn_top1" in r]
    row = measured[-1] if measured else _trained_row(workdir, step)
    if row is None or "knn_top1" not in row or "knn_top5" not in row:
        return None
    return {"knn_top1": round(float(row["knn_top1"]), 6), "knn_top5": round(float(row["knn_top5"]), 6)}
