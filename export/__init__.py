"""SavedModel export of bt_keras encoders for TF Serving, and a client for the served model.

    python -m export.savedmodel --checkpoint=runs/cifar10 --export_dir=models/bt_keras   # see export/README.md
    python -m export.client --rest=http://localhost:8501 --model=bt_keras cat.jpg      # embeddings as JSON

`export.savedmodel` needs TensorFlow; `export.client` needs only the standard library for REST (gRPC uses the
optional tensorflow-serving-api). This package imports neither until asked, so a client-only user loads no TF.
"""

__all__ = ["export_encoder", "load_for_export"]


def __getattr__(name):
    if name in __all__:
        from export import savedmodel

        return getattr(savedmodel, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
