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

    # Data (bt_keras.data names: tfds:NAME, folder:PATH, digits, cluttered_digits).
    c.dataset = "digits"
    c.split = "train"
    c.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data_dir
    c.download = False  # never download unless asked: offline machines must fail fast
    c.image_size = 32  # the encoder's input size; the views crop to it (unless view*.crop_size is set)
    c.shuffle_buffer = 10_000
    c.view1 = ml_collections.ConfigDict()  # augment.ViewConfig fields, filled by the recipe (config.recipe_views)
    c.view2 = ml_collections.ConfigDict()
    # Where the colour steps run (bt_keras.augment.device): "host" (tf.data) or "accelerator" (the model's train_step);
    # both give the same views. dct_scaling: decode large JPEG crops at 1/2-1/8 scale (faster; changes pixels slightly).
    c.augment_on = "host"
    c.dct_scaling = False
    # tf.data service (bt_keras.data.service): "grpc://HOST:PORT" of a dispatcher runs the pre-training pipeline on its
    # workers; "" reads locally. See bt_keras/data/service.py for what resuming guarantees then.
    c.data_service = ""
    # With data_service: a step that has not finished after this many seconds while the dispatcher no longer answers
    # ends the run (one line naming the address, exit code 4; bt_keras.train.watchdog), instead of waiting forever.
    c.data_service_stall_s = 30.0

    # Networks.
    # bt_keras.nets.backbones registry, or any Keras network as MODULE:CALLABLE (e.g. "keras.applications:ResNet50V2":
    # called with input_shape and backbone_options; keras.applications get weights=None, include_top=False,
    # pooling="avg" unless overridden; stem, width_multiplier, blocks and zero_init_residual do not apply to it)
    c.backbone = "resnet18"
    c.stem = "cifar"  # "imagenet" (7x7/2 + max-pool), "cifar" (3x3/1) or "cifar_pad2" (3x3/1, padding 2: solo-learn)
    c.width_multiplier = 1.0
    c.blocks = ml_collections.FieldReference(None, field_type=tuple)  # override blocks per stage (small demos)
    c.zero_init_residual = True  # last BN gamma of each residual branch starts at 0 (official; torchvision: False)
    # Extra keyword arguments of the backbone function, set in a recipe (e.g. {"pooling": "flatten"} for small_cnn,
    # {"alpha": 0.75, "minimalistic": True} for keras.applications:MobileNetV3Small).
    c.backbone_options = ml_collections.ConfigDict()
    c.synchronized_bn = True  # global-batch BN: N replicas == 1 device
    c.projector = "2048-2048-2048"
    c.projector_bias = False  # Dense layers of the projector without bias (official); solo-learn's have one
    c.lambd = 0.0051
    c.scale_loss = 1.0  # the loss optimised is scale_loss * (on + lambd * off) (solo-learn's CIFAR recipe: 0.1)

    # Optimisation (LARS + warm-up/cosine, bt_keras.method.optim).
    c.batch_size = 256  # GLOBAL batch, split over replicas
    c.epochs = 100
    c.steps_per_epoch = ml_collections.FieldReference(None, field_type=int)  # default: examples // batch_size
    c.optimizer = ml_collections.ConfigDict()
    # "lars" (bt_keras.method.optim, every field below), or "adamw": Keras's AdamW (betas 0.9/0.999, PyTorch's defaults)
    # with the same warm-up + cosine schedule peaking at lr_weights (x batch/256 if scale_by_batch), decoupled
    # weight_decay on every variable and `epsilon`; lr_biases, momentum, eta, trust_ratio and clip_lr are LARS's only.
    c.optimizer.name = "lars"
    c.optimizer.lr_weights = 0.2
    c.optimizer.lr_biases = 0.0048
    c.optimizer.scale_by_batch = True  # multiply both by batch_size / 256 (the paper)
    c.optimizer.momentum = 0.9
    c.optimizer.eta = 0.001
    c.optimizer.weight_decay = 1.5e-6
    c.optimizer.warmup_epochs = 10.0
    c.optimizer.end_lr_scale = 0.001
    c.optimizer.warmup_start_lr = 0.0  # the warm-up's first learning rate (solo-learn: 3e-5)
    c.optimizer.inclusive_warmup = False  # True: base lr at the warm-up's last step (solo-learn's scheduler)
    # "official", or "solo_learn": eta ||w|| / (||g|| + wd ||w|| + epsilon) (bt_keras.method.optim)
    c.optimizer.trust_ratio = "official"
    c.optimizer.clip_lr = False  # min(trust ratio / lr, 1) (solo-learn)
    c.optimizer.epsilon = 1e-8  # the "solo_learn" ratio's epsilon; AdamW's epsilon
    # R: the GPUs of the run whose hyperparameters the recipe states. The official code applies 1/R of the true
    # gradient; the builder takes the same step with weight_decay x R and lr_biases / R
    # (optim.reference_hyperparameters).
    c.optimizer.reference_replicas = 1

    # Online linear probe (bt_keras.method.probe): a linear classifier on the encoder's stop-gradient features, trained
    # during pre-training with its own optimizer, logged as online_top1; off when the dataset has no labels.
    c.online_probe = ml_collections.ConfigDict()
    c.online_probe.enabled = False
    # "sgd" (momentum SGD), "lars" (the main LARS rule: solo-learn's param group) or "adamw" (solo-learn's ViT recipes)
    c.online_probe.optimizer = "sgd"
    c.online_probe.lr = 0.1  # base lr, x batch/256 if optimizer.scale_by_batch; the main schedule's shape
    c.online_probe.momentum = 0.9
    c.online_probe.weight_decay = 0.0
    c.online_probe.eval_every_epochs = 0  # >0: its top-1 on eval_split (online_val_top1), as solo-learn reports
    c.online_probe.eval_split = "test"
    c.online_probe.eval_examples = 0  # 0: the whole split
    # Accelerators (bt_keras.train.step, bt_keras.method.precision): XLA-compile each replica's step (--xla), and the
    # dtype policy:
    # "float32", "mixed_float16" (GPUs; dynamic loss scaling) or "mixed_bfloat16" (TPUs, recent GPUs); --mixed_precision
    # picks float16, or bfloat16 on TPUs. Variables, the loss, C, BatchNorm statistics and LARS stay float32.
    c.jit_compile = False
    c.precision = "float32"
    c.fast_paths = True  # False: the plain formulation everywhere (bt_keras.fast_paths), to bisect a numerics question
    c.seed = 0

    # Checkpoints and monitoring.
    c.checkpoint_every_epochs = 1
    c.keep_checkpoints = 3  # the newest checkpoints kept; ckpt-0 (the initialisation) is kept besides them
    c.log_every_steps = 10
    c.picture_every_epochs = 1  # 0: no picture of C (no TensorBoard image, cross_correlation.png or .npy)
    c.report = True  # report.png when training ends; False: none (`python -m bt_keras.report WORKDIR` draws it)
    c.knn = ml_collections.ConfigDict()
    c.knn.every_epochs = 0  # 0: no online kNN monitor
    c.knn.train_split = "train"
    c.knn.test_split = "test"
    c.knn.train_examples = 10_000  # 0: the whole split
    c.knn.test_examples = 2_000
    c.knn.k = 200
    c.knn.temperature = 0.1
    c.knn.baselines = False  # at the end: kNN + linear probe of random init, raw pixels and the trained encoder
    c.knn.raw_pixel_size = 0  # raw-pixel baseline area-resized to this many px (0: config.image_size)
    return c


def complete(values) -> ml_collections.ConfigDict:
    """`values` (a recipe's ConfigDict, or a run's config.json read back as a dict) laid over `base_config()`: every
    field there, with its default where `values` lacks it, so the code reads `config.field` and no default is written
    twice. A run's config.json written before a field existed rebuilds as it was trained. JSON's lists become the
    tuples the schema holds (`blocks`, a view's `crop_scale`); fields the schema lacks are kept as given.

    The trainer completes its config once at the start; `assembly.artifacts` completes a run's saved config.json.
    """
    given = values.to_dict() if isinstance(values, ml_collections.ConfigDict) else dict(values)
    config = base_config()
    _lay_over(config, given, "config")
    return config


def _tuples(value):
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _lay_over(config: ml_collections.ConfigDict, given: dict, where: str) -> None:
    for key, value in given.items():
        if key not in config:  # no schema for it (a view's fields, backbone_options): JSON's lists were tuples
            with config.unlocked():
                config[key] = _tuples(value)
            continue
        default = config[key]
        if isinstance(default, ml_collections.ConfigDict) and isinstance(value, dict):
            _lay_over(default, value, f"{where}.{key}")
            continue
        field_type = config.get_type(key)
        if isinstance(value, list) and field_type is tuple:
            value = tuple(value)
        if isinstance(value, int) and not isinstance(value, bool) and field_type is float:
            value = float(value)
        try:
            config[key] = value
        except TypeError as error:
            raise TypeError(f"{where}.{key} = {value!r}: {error}") from None
