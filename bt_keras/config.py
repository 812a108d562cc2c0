"""Every field a pre-training recipe has, with its default: the schema that `experiments/*.py` fill in.

Recipes are data: ml_collections ConfigDicts (big_vision style): `experiments/NAME.py` defines `get_config()`, starting
from `base_config()` and changing what the recipe changes. Any field can be overridden on the command line,
e.g. `--config.batch_size=512 --config.optimizer.lr_weights=0.3 --config.view2.solarize_prob=0.3`.
This module and `bt_keras.views` load no TensorFlow, so reading a recipe is instant.
"""

from __future__ import annotations

import ml_collections

from bt_keras import views


def recipe_views(recipe: str) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """The two views of an augmentation preset ("cifar" or "imagenet") as config dicts, every `ViewConfig` field
    overridable from the command line (`--config.view2.solarize_prob=0.3`).

    `crop_size` is left unset: the builder takes `config.image_size`, so the crop size has one source of truth (set
    `--config.view1.crop_size` only to crop at another size than the encoder's input). `mean`/`std` are left out: they
    are the dataset's, taken at run time. Loads no TensorFlow (recipes are data).
    """
    presets = {"cifar": views.cifar_views, "imagenet": views.imagenet_views}
    if recipe not in presets:
        raise ValueError(f"Unknown augmentation recipe {recipe!r}; choose one of {sorted(presets)}.")
    result = []
    for view in presets[recipe]():
        fields = {k: v for k, v in view.to_dict().items() if k not in ("mean", "std", "crop_size")}
        config = ml_collections.ConfigDict(fields)
        config.crop_size = ml_collections.FieldReference(None, field_type=int)
        result.append(config)
    return tuple(result)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = ""  # recipe name, recorded with the encoder

    # Data (bt_keras.data names: tfds:NAME, folder:PATH, digits).
    c.dataset = "digits"
    c.split = "train"
    c.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data_dir
    c.download = False  # never download unless asked: offline machines must fail fast
    c.image_size = 32  # the encoder's input size; the views crop to it (unless view*.crop_size is set)
    c.shuffle_buffer = 10_000
    c.view1 = ml_collections.ConfigDict()  # augment.ViewConfig fields, filled by the recipe (config.recipe_views)
    c.view2 = ml_collections.ConfigDict()
    # Where the colour steps run (bt_keras.device_augment): "host" (tf.data) or "accelerator" (the model's train_step);
    # both give the same views. dct_scaling: decode large JPEG crops at 1/2-1/8 scale (faster; changes pixels slightly).
    c.augment_on = "host"
    c.dct_scaling = False
    # tf.data service (bt_keras.data_service): "grpc://HOST:PORT" of a dispatcher runs the pre-training pipeline on its
    # workers; "" reads locally. See bt_keras/data_service.py for what resuming guarantees then.
    c.data_service = ""

    # Networks.
    c.backbone = "resnet18"  # bt_keras.backbones registry
    c.stem = "cifar"  # "imagenet" (7x7/2 + max-pool) or "cifar" (3x3/1)
    c.width_multiplier = 1.0
    c.blocks = ml_collections.FieldReference(None, field_type=tuple)  # override blocks per stage (small demos)
    c.synchronized_bn = True  # global-batch BN: N replicas == 1 device
    c.projector = "2048-2048-2048"
    c.lambd = 0.0051

    # Optimisation (LARS + warm-up/cosine, bt_keras.optim).
    c.batch_size = 256  # GLOBAL batch, split over replicas
    c.epochs = 100
    c.steps_per_epoch = ml_collections.FieldReference(None, field_type=int)  # default: examples // batch_size
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr_weights = 0.2
    c.optimizer.lr_biases = 0.0048
    c.optimizer.scale_by_batch = True  # multiply both by batch_size / 256 (the paper)
    c.optimizer.momentum = 0.9
    c.optimizer.eta = 0.001
    c.optimizer.weight_decay = 1.5e-6
    c.optimizer.warmup_epochs = 10.0
    c.optimizer.end_lr_scale = 0.001
    c.jit_compile = False
    c.fast_paths = True  # False: the plain formulation everywhere (bt_keras.fast_paths), to bisect a numerics question
    c.seed = 0

    # Checkpoints and monitoring.
    c.checkpoint_every_epochs = 1
    c.keep_checkpoints = 3
    c.log_every_steps = 10
    c.picture_every_epochs = 1
    c.knn = ml_collections.ConfigDict()
    c.knn.every_epochs = 0  # 0: no online kNN monitor
    c.knn.train_split = "train"
    c.knn.test_split = "test"
    c.knn.train_examples = 10_000  # 0: the whole split
    c.knn.test_examples = 2_000
    c.knn.k = 200
    c.knn.temperature = 0.1
    return c
