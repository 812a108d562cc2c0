"""A training report to look at: one figure of a run's curves and its cross-correlation matrix, from its workdir.
(The command line: `python -m bt_keras.report WORKDIR`; the trainer writes it at the end of every run.)

`write_report(workdir)` reads what a run logs:

* `metrics.jsonl` (callbacks.MetricsLogger): loss, the on- and off-diagonal terms, learning rate, embedding std
  and kNN accuracy, against the optimizer step;
* `cross_correlation.npy` + `.json` (callbacks.CrossCorrelationPicture): the latest C of a fixed batch of view pairs
  as drawn (the whole matrix up to `MAX_SHOWN` features, its top-left block beyond), with its step and full size;
* `baselines.json` (bt_keras.train.baselines), when the run compared itself with random initialisation and raw pixels.

The figure (`report.png`): loss; on/off-diagonal terms (log scale); learning rate; embedding std (with 1/sqrt(D),
its value for embeddings spread evenly over the sphere); kNN top-1 (with the baselines as dashed lines); C as a heat
map (red +1, white 0, blue -1) with a colour bar; histograms of its diagonal (should approach 1) and off-diagonal
entries (should gather at 0). `figure_data` returns the numbers behind every panel, so tests can check them.

matplotlib is imported on first use only, with its non-interactive Agg backend (no display needed), so importing this
module stays light; `correlation_picture` gives the TensorBoard image of C the same colour bar.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from pathlib import Path

import numpy as np

from bt_keras import files, paths

_log = logging.getLogger(__name__)

MAX_SHOWN = 512  # C is drawn (and saved) whole up to this many features, its top-left block beyond
PANELS = ("loss", "loss terms", "learning rate", "embedding std", "kNN accuracy", "cross-correlation C",
          "diagonal of C", "off-diagonal of C")



# --------------------------------------------------------------------------------------------------- reading


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def read_metrics(workdir) -> list[dict]:
    """The records of `workdir/metrics.jsonl`, in order; a record logged again after a resume replaces the earlier
    one with the same (kind, step). Lines cut short by a kill are skipped; so are records whose step is not a
    non-negative integer, and values that are not numbers (a hand-edited file), with one warning counting them."""
    path = Path(workdir) / paths.METRICS_FILE
    if not path.exists():
        return []
    records, unreadable = {}, 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill: expected, not counted
        step = record.get("step") if isinstance(record, dict) else None
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
            unreadable += 1
            continue
        clean = {k: v for k, v in record.items() if k in ("kind", "step") or _is_number(v)}
        unreadable += len(clean) < len(record)
        records[(record.get("kind"), step)] = clean
    if unreadable:
        _log.warning("%s: %d record(s) with a step that is no integer or values that are no numbers; left out.",
                     path, unreadable)
    return sorted(records.values(), key=lambda r: (r["step"], r.get("kind") != "start"))


def final_metrics(workdir, records: list[dict] | None = None) -> dict:
    """The last epoch's logged values (loss, terms, lr, ..., step, epoch), with the latest kNN accuracy wherever it
    was logged; {} when the run logged no epoch. What a rerun of a finished run prints. `records`: `read_metrics`'s
    of `workdir`, when the caller has read them already."""
    records = read_metrics(workdir) if records is None else records
    epochs = [r for r in records if r.get("kind") == "epoch"]
    result = {k: v for k, v in (epochs[-1] if epochs else {}).items() if k not in ("kind", "time")}
    knn = [r for r in records if "knn_top1" in r]
    if knn and "knn_top1" not in result:
        result.update(knn_top1=knn[-1]["knn_top1"], knn_top5=knn[-1].get("knn_top5"))
    return result


def save_correlation(workdir, c, step: int, max_size: int = MAX_SHOWN) -> np.ndarray:
    """Writes the part of C [D, D] that is drawn (its top-left `max_size` block) as `cross_correlation.npy`, and its
    step and full size D as `cross_correlation.json`; returns the block."""
    c = np.asarray(c, np.float32)
    block = np.ascontiguousarray(c[:max_size, :max_size])
    workdir = Path(workdir)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, block)

    files.atomic_write(workdir / paths.CORRELATION_DATA, write)
    files.atomic_write_json(workdir / paths.CORRELATION_INFO,
                         {"step": int(step), "dim": int(c.shape[0]), "shown": int(block.shape[0])})
    return block


def read_correlation(workdir) -> dict | None:
    """{"block", "step", "dim"} as `save_correlation` wrote them, or None when the run saved no C."""
    workdir = Path(workdir)
    if not (workdir / paths.CORRELATION_DATA).exists():
        return None
    block = np.load(workdir / paths.CORRELATION_DATA)
    info = _read_json(workdir / paths.CORRELATION_INFO) or {}
    return {"block": block, "step": info.get("step"), "dim": int(info.get("dim", block.shape[0]))}


def read_baselines(workdir) -> dict | None:
    """`baselines.json` ({"step", "rows"}, bt_keras.train.baselines), or None when the run wrote none."""
    return _read_json(Path(workdir) / paths.BASELINES_FILE)


def off_diagonal(block: np.ndarray) -> np.ndarray:
    """The off-diagonal entries of a square matrix, row by row."""
    return block[~np.eye(block.shape[0], block.shape[1], dtype=bool)]


# -------------------------------------------------------------------------------------------------- drawing


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("The training report needs matplotlib: pip install matplotlib (it is in bt_keras' "
                          "install_requires; reinstall with pip install -e .).") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _draw_correlation(fig, ax, block: np.ndarray, dim: int, step: int | None):
    image = ax.imshow(block, cmap="bwr", vmin=-1.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="C_ij")
    shown = block.shape[0]
    where = f"step {step}, " if step is not None else ""
    part = f"top-left {shown} x {shown} of {dim} x {dim}" if shown < dim else f"{dim} x {dim}"
    ax.set_title(f"cross-correlation C\n({where}{part})", fontsize=10)
    ax.set_xlabel("feature j (view 2)")
    ax.set_ylabel("feature i (view 1)")
    return image


def correlation_picture(c, max_size: int = MAX_SHOWN, step: int | None = None) -> np.ndarray:
    """uint8 RGB picture [H, W, 3] of C (its top-left `max_size` block) with axes, title and a colour bar: the
    TensorBoard image and `cross_correlation.png`."""
    plt = _pyplot()
    c = np.asarray(c, np.float32)
    fig, ax = plt.subplots(figsize=(5.0, 4.3), dpi=100)
    _draw_correlation(fig, ax, c[:max_size, :max_size], c.shape[0], step)
    fig.tight_layout()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def _series(records, kind, key):
    points = [(r["step"], r[key]) for r in records if r.get("kind") == kind and key in r]
    return (np.array([p[0] for p in points]), np.array([p[1] for p in points])) if points else (None, None)


def _curves(axes, records):
    """Loss, terms, learning rate, embedding std from the per-step records (the per-epoch ones when none)."""
    kind = "train" if any(r.get("kind") == "train" for r in records) else "epoch"
    # Each panel: its title and its series as (metric, colour, legend label or None).
    panels = {
        "loss": ("loss  (on + lambda x off)", [("loss", "black", None)]),
        "loss terms": ("loss terms (log scale)", [("on_diagonal", "tab:red", "on-diagonal  sum (1 - C_ii)^2"),
                                                   ("off_diagonal", "tab:blue", "off-diagonal  sum C_ij^2")]),
        "learning rate": ("learning rate (weights)", [("lr", "tab:green", None)]),
        "embedding std": ("embedding std (0 = collapse)",
                          [("embedding_std", "tab:purple", "std of the unit-norm embedding")]),
    }
    for name, (title, series) in panels.items():
        ax = axes[name]
        for key, color, label in series:
            steps, values = _series(records, kind, key)
            if steps is not None:
                ax.plot(steps, values, color=color, lw=1.2, label=label)
        ax.set_title(title, fontsize=10)
    axes["loss terms"].set_yscale("log")
    axes["loss terms"].legend(fontsize=8)
    return kind


def _knn(ax, records, baselines):
    points = [(r["step"], r["knn_top1"]) for r in records if "knn_top1" in r]
    if points:
        steps, values = zip(*points)
        ax.plot(steps, values, "o-", color="tab:orange", lw=1.5, label="kNN top-1 (online monitor)")
    for row, color in zip((baselines or {}).get("rows", []), ("tab:gray", "tab:brown", "tab:orange")):
        if row["name"].startswith("Barlow Twins"):
            continue
        ax.axhline(row["knn_top1"], color=color, ls="--", lw=1, label=f"{row['name']}: {row['knn_top1']:.3f}")
    if points or baselines:
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no kNN monitor in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("kNN top-1 on the test split", fontsize=10)
    shown = [v for _, v in points] + [r["knn_top1"] for r in (baselines or {}).get("rows", [])]
    ax.set_ylim(max(0.0, min(shown, default=0.0) - 0.05), 1.005)


def _histograms(axes, correlation):
    diag_ax, off_ax = axes["diagonal of C"], axes["off-diagonal of C"]
    if correlation is None:
        for ax in (diag_ax, off_ax):
            ax.text(0.5, 0.5, "no cross_correlation.npy", ha="center", va="center", transform=ax.transAxes)
        return
    diagonal, off = np.diagonal(correlation["block"]), off_diagonal(correlation["block"])
    diag_ax.hist(diagonal, bins=40, range=(-1, 1), color="tab:red")
    diag_ax.axvline(1.0, color="black", lw=0.8, ls=":")
    diag_ax.set_title(f"diagonal of C ({diagonal.size} of {correlation['dim']} values)\nmean {diagonal.mean():.3f}  (target 1)",
                      fontsize=10)
    off_ax.hist(off, bins=80, range=(-1, 1), color="tab:blue", log=True)
    off_ax.axvline(0.0, color="black", lw=0.8, ls=":")
    off_ax.set_title(f"off-diagonal of C ({off.size} values, log count)\nrms {math.sqrt(np.mean(off ** 2)):.3f}  "
                     "(target 0)", fontsize=10)
    for ax in (diag_ax, off_ax):
        ax.set_xlabel("value")


def figure_data(workdir) -> dict:
    """The numbers behind each panel of the report, by PANELS name: step/value arrays of the curves, the kNN points
    and baselines, and C's block with its diagonal and off-diagonal entries (None where the run logged nothing)."""
    records = read_metrics(workdir)
    kind = "train" if any(r.get("kind") == "train" for r in records) else "epoch"
    correlation = read_correlation(workdir)
    result = {name: _series(records, kind, key) for name, key in
              (("loss", "loss"), ("learning rate", "lr"), ("embedding std", "embedding_std"))}
    result["loss terms"] = {key: _series(records, kind, key) for key in ("on_diagonal", "off_diagonal")}
    result["kNN accuracy"] = {"points": [(r["step"], r["knn_top1"]) for r in records if "knn_top1" in r],
                              "baselines": (read_baselines(workdir) or {}).get("rows", [])}
    # Mixed float16 runs: the loss scale and the steps it skipped (absent otherwise).
    result["loss scaling"] = {key: _series(records, kind, key) for key in ("loss_scale", "skipped_steps")}
    block = None if correlation is None else correlation["block"]
    result["cross-correlation C"] = correlation
    result["diagonal of C"] = None if block is None else np.diagonal(block).copy()
    result["off-diagonal of C"] = None if block is None else off_diagonal(block)
    return result


def figure(workdir):
    """The report's matplotlib Figure for `workdir` (see the module docstring); its axes carry the PANELS names
    as their labels (`ax.get_label()`)."""
    workdir = Path(workdir)
    records = read_metrics(workdir)
    correlation = read_correlation(workdir)
    baselines = read_baselines(workdir)
    plt = _pyplot()
    fig, grid = plt.subplots(2, 4, figsize=(20, 9), dpi=100)
    axes = {name: ax for name, ax in zip(PANELS, grid.ravel())}
    for name, ax in axes.items():
        ax.set_label(name)
    kind = _curves(axes, records)
    _knn(axes["kNN accuracy"], records, baselines)
    if correlation is not None:
        dim = correlation["dim"]
        axes["embedding std"].axhline(1 / math.sqrt(dim), color="gray", ls="--", lw=1, label=f"1/sqrt(D), D={dim}")
        _draw_correlation(fig, axes["cross-correlation C"], correlation["block"], dim, correlation["step"])
    else:
        axes["cross-correlation C"].text(0.5, 0.5, "no cross_correlation.npy", ha="center", va="center",
                                         transform=axes["cross-correlation C"].transAxes)
    if axes["embedding std"].get_legend_handles_labels()[0]:
        axes["embedding std"].legend(fontsize=8)
    _histograms(axes, correlation)
    for name in PANELS[:5]:
        axes[name].set_xlabel("optimizer step")
        axes[name].grid(alpha=0.3)
    config = _read_json(workdir / paths.CONFIG_FILE) or {}
    last = final_metrics(workdir)
    title = f"Barlow Twins run {config.get('name') or workdir.name}: {config.get('dataset', '?')}, " \
            f"{config.get('backbone', '?')}, projector {config.get('projector', '?')}, batch " \
            f"{config.get('batch_size', '?')}; step {last.get('step', 0)}"
    if "knn_top1" in last:
        title += f", kNN top-1 {last['knn_top1']:.3f}"
    if "skipped_steps" in last:  # dynamic loss scaling (mixed_float16): how many updates it dropped
        title += f"; {config.get('precision', 'mixed')}: {int(last['skipped_steps'])} step(s) skipped by loss " \
                 f"scaling (scale now {last.get('loss_scale', float('nan')):g})"
    fig.suptitle(title + ("" if kind == "train" else "  (per-epoch values)"), fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return fig


def write_report(workdir) -> Path:
    """Draws the report of `workdir` and writes it as `report.png` there; returns its path."""
    workdir = Path(workdir)
    if not (workdir / paths.METRICS_FILE).exists():
        raise FileNotFoundError(f"{workdir / paths.METRICS_FILE} does not exist: pass the --workdir of a "
                                "`python -m bt_keras.train` run.")
    plt = _pyplot()
    fig = figure(workdir)
    path = workdir / paths.REPORT_PICTURE
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), suffix=".png")
    plt.close(fig)
    return path
