"""Evaluation of Barlow Twins encoders with the paper's protocols (Zbontar et al. 2021, Sec. 4).

    python -m bt_keras.evaluate.knn      --encoder=runs/cifar10 --dataset=tfds:cifar10 --data_dir=../shared/tfds
    python -m bt_keras.evaluate.linear   --encoder=runs/cifar10 --dataset=tfds:cifar10 [--mode=features|full]
    python -m bt_keras.evaluate.finetune --encoder=runs/cifar10 --dataset=tfds:cifar10 --subset=0.01

Modules, one protocol each:
  `knn`       weighted kNN (k=200, T=0.1) on frozen features: `knn_accuracy`, `knn_scores`
  `linear`    linear probe: L-BFGS on cached features (`linear_probe_features`) or the paper's 100-epoch SGD on the
              frozen backbone (`linear_probe`); `train_classifier` is the SGD loop both SGD protocols use
  `finetune`  fine-tuning on 1% / 10% of the labels (`finetune`)
  `common`    opening encoders (workdirs, .keras files, checkpoints, SavedModel exports), preprocessing, labelled
              batches, `extract_features`, `topk_accuracy`, result JSON and table

Each CLI accepts the same encoders, reads preprocessing from the encoder's metadata, shows progress bars, prints
a one-row Markdown table and writes a JSON result (`--output`, default beside the encoder).
The functions listed in `__all__` are importable from this package directly (loaded on first use); the
fine-tuning function is `bt_keras.evaluate.finetune.finetune` (the package attribute `finetune` is the module).
"""

_EXPORTS = {
    "knn_accuracy": "knn", "knn_scores": "knn",
    "linear_probe_features": "linear", "linear_probe": "linear", "train_classifier": "linear",
    "open_encoder": "common", "extract_features": "common", "topk_accuracy": "common",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"bt_keras.evaluate.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'bt_keras.evaluate' has no attribute {name!r}")
