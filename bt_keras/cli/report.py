"""The training report of a run: `python -m bt_keras.report WORKDIR` writes WORKDIR/report.png.

One figure: loss, on/off-diagonal terms, learning rate, embedding std and kNN accuracy against steps, and the
cross-correlation matrix C as a heat map with a colour bar beside histograms of its diagonal and off-diagonal
entries (see `bt_keras.train.figures`). `bt_keras.cli.train` writes the same file at the end of every run.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m bt_keras.report WORKDIR   (the --workdir of a `python -m bt_keras.train` run)",
              file=sys.stderr)
        return 2
    from bt_keras.train import figures  # file names from bt_keras.paths: neither TensorFlow nor Keras loads
    try:
        path = figures.write_report(argv[0])
    except (FileNotFoundError, ImportError) as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 2
    print(f"Report: {path}")
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
