"""Exports a Barlow Twins encoder as an ONNX model (the code: bt_keras.cli.onnx / onnx_export).

    python -m export.onnx --checkpoint=runs/cifar10 --output=models/encoder.onnx [--l2_normalize] [--opset=N]

Needs `pip install -e ".[onnx]"`; export/README.md ("ONNX") describes the model's contract.
"""

from bt_keras.cli import onnx as onnx_cli  # its run() defines the flags and lists them in --help

if __name__ == "__main__":
    onnx_cli.run()
