"""The ONNX export command line: `python -m export.onnx` (from the repository) or `bt-keras-export-onnx` (installed).

    python -m export.onnx --checkpoint=runs/cifar10 --output=models/encoder.onnx [--l2_normalize] [--opset=N]

`--checkpoint` is what export.savedmodel takes: a training workdir, a folder written by `python -m bt_keras.convert`, an
encoder.keras or a BarlowTwins .keras. The ONNX model maps `normalized` float32 [batch, S, S, 3] (preprocessed as
evaluation does) to `embedding` float32 [batch, D]; its metadata_props record S, mean and std
(`bt_keras.serving.onnx_export`). Needs `pip install -e ".[onnx]"`. Errors are one line `ERROR: ...`, exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging

from bt_keras.assembly import artifacts
from bt_keras.cli import list_flags_in_help
from bt_keras.serving.onnx_export import export_onnx


def _define_flags():
    flags.DEFINE_string("checkpoint", None, "Training workdir, converted folder, encoder.keras or BarlowTwins .keras.")
    flags.DEFINE_string("output", None, "The .onnx file to write.")
    flags.DEFINE_bool("l2_normalize", False, "Output L2-normalised embeddings.")
    flags.DEFINE_integer("opset", None, "ONNX opset (default: tf2onnx's).")
    flags.mark_flags_as_required(["checkpoint", "output"])


def main(argv) -> None:
    f = flags.FLAGS
    logging.set_verbosity(logging.WARNING)
    try:
        if len(argv) > 1:
            raise ValueError(f"unexpected arguments {argv[1:]}")
        if not Path(f.checkpoint).exists():
            raise FileNotFoundError(f"--checkpoint {f.checkpoint} does not exist.")
        encoder, metadata = artifacts.load_encoder(f.checkpoint)
        path = export_onnx(encoder, metadata, f.output, l2_normalize=f.l2_normalize, opset=f.opset,
                           source=str(Path(f.checkpoint).resolve()))
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as error:
        print(f"ERROR: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    print(f"Exported {f.checkpoint} to {path} (input `normalized` [batch, {metadata['image_size']}, "
          f"{metadata['image_size']}, 3], output `embedding` [batch, {int(encoder.output_shape[-1])}]).")


def run() -> None:
    """Console entry point (`bt-keras-export-onnx`). The flags are defined here, not on import: two of them are
    required, and a process that imports this module for `main` must still parse other commands' flags."""
    _define_flags()
    list_flags_in_help(__name__, doc=__doc__)
    app.run(main)


if __name__ == "__main__":
    run()
