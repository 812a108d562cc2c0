"""Exports a Barlow Twins encoder as a versioned SavedModel for TF Serving (the code: bt_keras.serving).

    python -m export.savedmodel --checkpoint=runs/cifar10 --export_dir=models/bt_keras [--version=N]
        [--l2_normalize] [--include_projector] [--batch_warmup_sizes=1,8] [--model_name=bt_keras]

export/README.md describes the signatures and how to serve the export.
"""

from bt_keras.cli import export as export_cli  # its run() defines the flags and lists them in --help

if __name__ == "__main__":
    export_cli.run()
