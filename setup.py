"""Installs bt_keras: Barlow Twins self-supervised learning for TensorFlow/Keras.

TensorFlow is named as ``tensorflow>=2.21``. That wheel runs on CPU everywhere and on NVIDIA GPUs when the CUDA
libraries are present (``tensorflow[and-cuda]`` pulls them in). ``tensorflow-cpu`` is a different distribution
name, so installing it first does not satisfy ``tensorflow``: pip would add the full wheel beside it. To build
against another TensorFlow distribution, name it in ``BT_KERAS_TENSORFLOW`` at install time, e.g.
``BT_KERAS_TENSORFLOW=tensorflow-cpu pip install -e .`` or ``BT_KERAS_TENSORFLOW="tensorflow[and-cuda]"``.
"""

import os
import re

from setuptools import find_packages, setup


def tensorflow_requirement() -> str:
    """`tensorflow>=2.21`, or the distribution named in BT_KERAS_TENSORFLOW (same lower bound)."""
    name = os.environ.get("BT_KERAS_TENSORFLOW", "tensorflow").strip()
    if not re.fullmatch(r"tensorflow(-cpu|-macos|-intel)?(\[[a-z0-9_,-]+\])?", name):
        raise SystemExit(
            f"BT_KERAS_TENSORFLOW={name!r} is not a TensorFlow distribution; use e.g. tensorflow, "
            "tensorflow-cpu or tensorflow[and-cuda]."
        )
    return f"{name}>=2.21"


INSTALL_REQUIRES = [
    tensorflow_requirement(),
    "keras>=3.15",
    "tensorflow-datasets>=4.9.10",
    "importlib_resources>=6.0",  # tensorflow-datasets 4.9.10 imports it at run time on Python 3.11
    "absl-py>=2.1",
    "ml-collections>=1.0",
    "numpy>=1.26",
    "scikit-learn>=1.4",  # the embedded `digits` dataset and the L-BFGS linear probe
    "pillow>=10.0",
    "tensorboard>=2.20",  # tf.summary needs it installed (the tensorflow wheel no longer pulls it in)
    "matplotlib>=3.7",  # the training report and the colour-barred picture of C (bt_keras.train.figures)
]

# ONNX export (bt_keras.serving.onnx_export): Keras's model.export(format="onnx") converts with tf2onnx; 1.17 is the
# first release without the protobuf~=3.20 pin that conflicts with TensorFlow 2.21. Tested: tf2onnx 1.17.0, onnx 1.23.2,
# onnxruntime 1.32.0 (numpy 2.4, Python 3.11).
ONNX_REQUIRES = ["tf2onnx>=1.17", "onnx>=1.17"]

EXTRAS_REQUIRE = {
    # tensorflow-serving-api: the warm-up record and gRPC tests compare against the official protos.
    # onnxruntime (+ the ONNX exporter): tests/serving/test_onnx_export.py runs the exported model.
    # keras-hub: tests/nets/test_vit.py builds and trains the ViT recipe's network (they skip without it).
    "test": ["pytest>=8.0", "pytest-xdist>=3.5", "tensorflow-serving-api>=2.18", "onnxruntime>=1.20",
             "keras-hub>=0.32", *ONNX_REQUIRES],
    "onnx": ONNX_REQUIRES,
    "serving": ["tensorflow-serving-api>=2.18"],
    # KerasHub's ViTBackbone for the ViT-S/16 recipe (bt_keras.nets.vit, experiments/imagenet_vit_small.py). 0.32.0
    # installs beside TensorFlow 2.21 / Keras 3.15 without changing them (it adds tensorflow-text 2.21, sentencepiece,
    # tokenizers, kagglehub, huggingface_hub).
    "hub": ["keras-hub>=0.32"],
}

setup(
    name="bt_keras",
    version="0.1.0",
    description="Barlow Twins (Zbontar et al., ICML 2021) for TensorFlow/Keras: exact under tf.distribute, exportable.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # Only bt_keras is installed: export/ in the repository holds thin command lines over bt_keras.serving, and a
    # top-level `export` package in site-packages would collide with any other project's.
    packages=find_packages(include=["bt_keras", "bt_keras.*"]),
    package_data={"bt_keras.kernels": ["*.cc"]},  # compiled on first use (bt_keras/kernels/__init__.py)
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "bt-keras-train = bt_keras.cli.train:run",
            "bt-keras-export = bt_keras.cli.export:run",
            "bt-keras-client = bt_keras.cli.client:run",
            "bt-keras-export-onnx = bt_keras.cli.onnx:run",
            "bt-keras-convert = bt_keras.cli.convert:run",
            "bt-keras-data-check = bt_keras.cli.data_check:run",
        ],
    },
)
