"""Prints the Markdown table of experiments/RESULTS.md from the evaluation JSONs of a training workdir.

    python experiments/results_table.py runs/cifar10_budget

Reads every `eval_<protocol>_<dataset>_step<N>.json` that `bt_keras.evaluate.*` wrote for the workdir's checkpoints
and prints one row per step (images seen, kNN and linear top-1 / top-5), step 0 being the random initialisation.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def collect(workdir: Path) -> dict[int, dict[str, dict]]:
    """{step: {protocol: result record}} from the workdir's per-checkpoint evaluation files."""
    rows: dict[int, dict[str, dict]] = {}
    for path in sorted(workdir.glob("eval_*_step*.json")):
        step = int(re.search(r"_step(\d+)\.json$", path.name).group(1))
        record = json.loads(path.read_text())
        rows.setdefault(step, {})[record["protocol"]] = record
    return rows


def table(workdir: Path) -> str:
    config = json.loads((workdir / "config.json").read_text())
    batch = config.get("batch_size")
    rows = collect(workdir)
    if not rows:
        raise SystemExit(f"No eval_*_step*.json in {workdir}: run bt_keras.cli.evaluate_knn / linear on its checkpoints.")
    lines = [
        "| step | images seen | kNN top-1 % | kNN top-5 % | linear (features) top-1 % | linear (features) top-5 % |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for step in sorted(rows):
        cells = [str(step), f"{step * batch:,}" if batch else "?"]
        for protocol in ("knn", "linear_features"):
            record = rows[step].get(protocol)
            cells += [f"{100 * record['top1']:.1f}", f"{100 * record['top5']:.1f}"] if record else ["-", "-"]
        if step == 0:
            cells[0] = "0 (random init)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(table(Path(sys.argv[1])))
