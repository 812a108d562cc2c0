"""Exports a Barlow Twins encoder as an ONNX model (the code: bt_keras.cli.onnx / onnx_export).

    python -m export.onnx --checkpoint=runs/cifar10 --output=models/encoder.onnx [--l2_normalize] [--opset=N]

Needs `pip install -e ".[onnx]"`; export/README.md ("ONNX") describes the model's contract.
"""

from absl import flags

from bt_keras.cli import onnx as onnx_cli

flags.adopt_module_key_flags(onnx_cli)  # --help lists the export's flags

if __name__ == "__main__":
    onnx_cli.run()
