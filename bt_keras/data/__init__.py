"""Data, layer 4: datasets by name and the tf.data streams built on them.

  `sources`      `tfds:NAME`, `folder:PATH`, `digits` and `cluttered_digits` opened as (image, label) streams;
                 `dataset_info`
  `cluttered_digits`  those digits moved, scaled and rotated among clutter on 32x32 canvases, generated
                 deterministically
  `folder_walk`  a walk of an image folder that meets each real file once
  `pretrain`     `pretrain_dataset` / `pair_batches`: seeded, shardable, resumable (view1, view2) batches
  `labelled`     `labelled_dataset`: normalised (image, label) batches for the probes
  `service`      the pre-training pipeline on tf.data service workers (`--data_service=grpc://HOST:PORT`)

Public names (`bt_keras.data.pretrain_dataset`, `.dataset_info`, ...) resolve from these modules on first use.
"""

from bt_keras.lazy_names import folder_names

# Where the public names live, searched in this order.
HOMES = ("bt_keras.data.sources", "bt_keras.data.pretrain", "bt_keras.data.labelled")
__getattr__, __dir__ = folder_names(__name__, HOMES, lambda: globals())
