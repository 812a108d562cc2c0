"""Embeds image files with a bt_keras model served by TF Serving (the command line: bt_keras.cli.client).

    python -m export.client --rest=http://localhost:8501 --model=bt_keras cat.jpg dog.png
    python -m export.client --grpc=localhost:8500 --model=bt_keras cat.jpg      # needs tensorflow-serving-api

Prints one JSON object per image, `{"image": path, "embedding": [...]}`. Loads no TensorFlow for REST.
"""

from bt_keras.cli.client import main, run

__all__ = ["main", "run"]

if __name__ == "__main__":
    run()
