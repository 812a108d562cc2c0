"""Library code of the evaluation protocols (Zbontar et al. 2021, Sec. 4); the CLIs are in `bt_keras.evaluate`.

Modules, one job each:
  `preprocessing`  how images are fed to an encoder (`resolve_preprocessing`) and its labelled / training batches
  `features`       `extract_features` (inference mode) and `topk_accuracy`
  `knn`            weighted kNN (k=200, T=0.1) on frozen features: `knn_scores`, `knn_accuracy`
  `classifiers`    linear probes (L-BFGS on features, the paper's SGD protocol) and fine-tuning
  `protocol`       what a CLI run checks and records: `setup` (encoder + dataset, validated) and `finish` (JSON + table)

Encoders are opened by `bt_keras.assembly.artifacts.open_encoder` (every format: workdirs, .keras files, checkpoints,
SavedModel exports).
"""
