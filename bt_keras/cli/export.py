"""The export command line: `python -m export.savedmodel` (from the repository) or `bt-keras-export` (installed).

    python -m export.savedmodel --checkpoint=runs/cifar10 --export_dir=models/bt_keras [--version=N]
        [--l2_normalize] [--include_projector] [--batch_warmup_sizes=1,8] [--model_name=bt_keras]

writes `<export_dir>/<version>/` (version: the next integer after the versions already there): the SavedModel with
the signatures `serving_default` (encoded image bytes), `embed_pixels` (uint8 NHWC) and `embed_normalized`
(preprocessed floats), TF Serving's warm-up requests and `assets.extra/bt_keras.json`. See export/README.md.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from absl import app, flags, logging

from bt_keras.cli import console, list_flags_in_help

with console.quiet_start():  # TensorFlow loads here: its start-up lines filtered (bt_keras.cli.console)
    from bt_keras.assembly import artifacts
    from bt_keras.serving.savedmodel import export_encoder
    from bt_keras.serving.signatures import check_max_image_pixels, DEFAULT_MAX_IMAGE_PIXELS
    from bt_keras.serving.warmup import DEFAULT_MODEL_NAME, DEFAULT_WARMUP_BATCH_SIZES


def _define_flags():
    flags.DEFINE_string("checkpoint", None, "Training workdir, encoder.keras or BarlowTwins .keras file.")
    flags.DEFINE_string("export_dir", None, "TF Serving's model base path; the version folder goes inside.")
    flags.DEFINE_integer("version", None, "Version folder (default: the next integer after those present).")
    flags.DEFINE_bool("l2_normalize", False, "Serve L2-normalised embeddings.")
    flags.DEFINE_bool("include_projector", False, "Also serve the projector's output as `projection`.")
    flags.DEFINE_list("batch_warmup_sizes", [str(n) for n in DEFAULT_WARMUP_BATCH_SIZES],
                      "Batch sizes of the serving_default warm-up requests.")
    flags.DEFINE_string("model_name", DEFAULT_MODEL_NAME, "Model name for TF Serving (--model_name).")
    flags.DEFINE_integer("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS, "Refuse images with more pixels than this.")
    flags.mark_flags_as_required(["checkpoint", "export_dir"])


def main(argv) -> None:
    if len(argv) > 1:
        sys.exit(f"export: unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    logging.set_verbosity(logging.WARNING)  # TF's INFO lines about tracing and assets are noise here
    try:
        check_max_image_pixels(f.max_image_pixels)
    except ValueError as error:  # a usage error: exit 2, as for other bad flags
        print(f"export: --{error}", file=sys.stderr)
        sys.exit(2)
    try:
        if not all(re.fullmatch(r"\d+", n.strip()) for n in f.batch_warmup_sizes):
            raise ValueError(f"--batch_warmup_sizes must be comma-separated positive integers, e.g. 1,8; "
                             f"got {','.join(f.batch_warmup_sizes)!r}")
        sizes = [int(n) for n in f.batch_warmup_sizes]
        if f.include_projector:
            encoder, projector, metadata = artifacts.load_with_projector(f.checkpoint)
        else:
            (encoder, metadata), projector = artifacts.load_encoder(f.checkpoint), None
        path = export_encoder(encoder, metadata, f.export_dir, version=f.version, l2_normalize=f.l2_normalize,
                              projector=projector, model_name=f.model_name, warmup_batch_sizes=sizes,
                              max_image_pixels=f.max_image_pixels, source=str(Path(f.checkpoint).resolve()))
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        sys.exit(f"export: {error}")
    base = Path(f.export_dir).resolve()
    print(f"Exported {f.checkpoint} to {path}\n"
          f"Serve it: tensorflow_model_server --port=8500 --rest_api_port=8501 "
          f"--model_name={f.model_name} --model_base_path={base}")


def run():
    """Console entry point (`bt-keras-export`). The flags are defined here, not on import: two of them are required,
    and a process that imports this module for `main` (a test, a notebook) must still parse other commands' flags."""
    _define_flags()
    list_flags_in_help(__name__, doc=__doc__)
    app.run(main)


if __name__ == "__main__":
    run()
