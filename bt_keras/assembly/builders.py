"""From a recipe (a completed ml_collections config, `bt_keras.config.complete`) to the objects training needs.

The run's dataset facts are worked out once (`run_data`) and passed in. Kept apart from the loop
(`bt_keras.train.trainer`) so that evaluation and export can rebuild a run's networks from its `config.json`
(`build_networks`) without a dataset or the training loop.
"""

from __future__ import annotations

import dataclasses

import keras
from absl import logging

from bt_keras.augment import device as device_augment
from bt_keras.data import sources
from bt_keras.method import optim, precision
from bt_keras.method.model import BarlowTwins
from bt_keras.method.probe import OnlineProbe
from bt_keras.nets import backbones, heads
from bt_keras.views import ViewConfig


@dataclasses.dataclass(frozen=True)
class RunData:
    """What a run needs to know of its dataset, worked out once (`run_data`, one `dataset_info`) and passed down to
    the model, the pipeline, the checks and the monitors."""

    info: sources.DatasetInfo | None  # None: a run built without a dataset (the accelerator benchmark)
    views: tuple[ViewConfig, ViewConfig] | None
    steps_per_epoch: int
    probe_classes: int = 0  # the online probe's classes; 0: no probe


def run_data(config) -> RunData:
    """The dataset facts of a (completed) config: its `DatasetInfo`, the two views normalised with its statistics,
    the steps per epoch and the online probe's classes."""
    info = sources.dataset_info(config.dataset, config.data_dir, config.download)
    return RunData(info, views_from_config(config, info), steps_per_epoch(config, info),
                   online_probe_classes(config, info))


def views_from_config(config, info: sources.DatasetInfo) -> tuple[ViewConfig, ViewConfig]:
    """`config.view1` / `config.view2` as ViewConfigs, normalised with the dataset's mean and std.

    A view's `crop_size` is `config.image_size` unless the recipe sets it: one number, one source of truth.
    """
    views = []
    for name in ("view1", "view2"):
        fields = {k: v for k, v in config[name].items() if v is not None}
        fields.setdefault("crop_size", config.image_size)
        views.append(ViewConfig.from_dict({**fields, "mean": tuple(info.mean), "std": tuple(info.std)}))
    return tuple(views)


def build_networks(config) -> tuple[keras.Model, keras.Model]:
    """The recipe's encoder and projector, nothing else (no dataset needed): what a checkpoint's encoder is read
    into. A `MODULE:CALLABLE` backbone (`backbones.foreign_backbone`) gets the image shape, config.synchronized_bn
    and config.backbone_options only: the ResNet fields (stem, width_multiplier, blocks, zero_init_residual) are
    ours."""
    shape = (config.image_size, config.image_size, 3)
    options = dict(config.backbone_options or {})
    if backbones.is_foreign(config.backbone):
        encoder = backbones.get_backbone(config.backbone, input_shape=shape, synchronized_bn=config.synchronized_bn,
                                         **options)
    else:
        encoder = backbones.get_backbone(
            config.backbone,
            input_shape=shape,
            stem=config.stem,
            width_multiplier=config.width_multiplier,
            blocks=tuple(config.blocks) if config.blocks else None,
            zero_init_residual=bool(config.zero_init_residual),
            synchronized_bn=config.synchronized_bn,
            **options,
        )
    projector = heads.projector(config.projector, synchronized_bn=config.synchronized_bn,
                                use_bias=bool(config.projector_bias))
    return encoder, projector


def build_model(config, run: RunData | None = None) -> BarlowTwins:
    """Encoder + projector, and with the run's data (`run_data`) the online probe when the recipe asks for it and
    the dataset has labels, and the on-device augmentation when `config.augment_on == "accelerator"` (call inside
    the strategy's scope)."""
    encoder, projector = build_networks(config)
    probe = None
    if run is not None and run.probe_classes:
        probe = OnlineProbe(run.probe_classes, build_probe_optimizer(config, run.steps_per_epoch))
    on_device = build_device_augment(config, run.views) if run is not None and run.views is not None else None
    return BarlowTwins(encoder, projector, lambd=config.lambd, scale_loss=float(config.scale_loss),
                       online_probe=probe, device_augment=on_device)


def online_probe_classes(config, info: sources.DatasetInfo) -> int:
    """The online probe's number of classes: 0 when `config.online_probe.enabled` is off or the dataset has no
    labels (then logged)."""
    if not config.online_probe.enabled:
        return 0
    if info.num_classes < 2:
        logging.warning("Online probe off: %s has no labels.", config.dataset)
        return 0
    return info.num_classes


def _schedule(config, base_lr: float, steps_per_epoch: int) -> optim.WarmupCosine:
    """The recipe's warm-up + cosine schedule peaking at `base_lr` (already scaled by the batch if it must be)."""
    o = config.optimizer
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = int(o.warmup_epochs * steps_per_epoch)
    if warmup_steps > total_steps:
        logging.warning("Warm-up (%d steps) is longer than the run (%d steps): shortened to the run.",
                        warmup_steps, total_steps)
        warmup_steps = total_steps
    return optim.WarmupCosine(base_lr, warmup_steps=warmup_steps, total_steps=total_steps, end_scale=o.end_lr_scale,
                              warmup_start_lr=float(o.warmup_start_lr), inclusive_warmup=bool(o.inclusive_warmup))


def _lr_scale(config) -> float:
    return config.batch_size / 256 if config.optimizer.scale_by_batch else 1.0


def _lars_form(o) -> dict:
    """The LARS rule's options from `config.optimizer`."""
    return dict(trust_ratio=o.trust_ratio, clip_lr=bool(o.clip_lr), epsilon=float(o.epsilon))


def optimizer_hyperparameters(config) -> dict:
    """LARS's weight decay and bias/BN learning rate for our true gradient, from the recipe's published ones.

    With `config.optimizer.reference_replicas` = R > 1 the recipe states the hyperparameters of an official run on
    R GPUs, whose steps use 1/R of the true gradient; the same steps here need weight decay x R and the bias/BN
    learning rate / R (`optim.reference_hyperparameters` has the maths). Only the official LARS form converts.
    Returns {"weight_decay", "lr_biases", "replicas"} (lr_biases before the batch scaling).
    """
    o = config.optimizer
    replicas = o.reference_replicas
    weight_decay, lr_biases = float(o.weight_decay), float(o.lr_biases)
    if replicas != 1:
        form = _lars_form(o)
        if form["trust_ratio"] != "official" or form["clip_lr"]:
            raise ValueError(
                f"config.optimizer.reference_replicas={replicas} converts the official LARS form only; with "
                f"trust_ratio={form['trust_ratio']!r}, clip_lr={form['clip_lr']} no hyperparameters take the "
                "R-GPU step exactly. Set reference_replicas=1 (solo-learn's recipe is single-GPU).")
        weight_decay, lr_biases = optim.reference_hyperparameters(weight_decay, lr_biases, replicas)
    return {"weight_decay": weight_decay, "lr_biases": lr_biases, "replicas": replicas}


def build_optimizer(config, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """LARS with the warm-up + cosine schedule; learning rates scaled by batch/256 when the recipe says so, and the
    published hyperparameters converted to our true gradient (`optimizer_hyperparameters`), logged."""
    o = config.optimizer
    scale = _lr_scale(config)
    if o.name == "adamw":
        return _adamw(config, scale, steps_per_epoch)
    if o.name != "lars":
        raise ValueError(f"config.optimizer.name must be 'lars' or 'adamw', got {o.name!r}.")
    hyper = optimizer_hyperparameters(config)
    if hyper["replicas"] != 1:
        logging.info(
            "LARS for the true gradient, equal to the official %d-GPU step (gradient / %d): weight decay %g -> %g "
            "(x %d), bias/BN learning rate %g -> %g (/ %d), weights' learning rate %g unchanged (all x batch/256 = "
            "%g where scaled).", hyper["replicas"], hyper["replicas"], o.weight_decay, hyper["weight_decay"],
            hyper["replicas"], o.lr_biases, hyper["lr_biases"], hyper["replicas"], o.lr_weights, scale)
    form = _lars_form(o)
    logging.info("LARS (%s form%s): lr %g (biases/BN %g), weight decay %g, eta %g, momentum %g.", form["trust_ratio"],
                 ", clip_lr" if form["clip_lr"] else "", o.lr_weights * scale, hyper["lr_biases"] * scale,
                 hyper["weight_decay"], o.eta, o.momentum)
    return optim.LARS(_schedule(config, o.lr_weights * scale, steps_per_epoch), momentum=o.momentum, eta=o.eta,
                      weight_decay=hyper["weight_decay"], bias_lr_scale=hyper["lr_biases"] / o.lr_weights, **form)


def _adamw(config, scale: float, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Keras's AdamW (PyTorch's torch.optim.AdamW defaults: betas 0.9/0.999; epsilon from the config, 1e-8 as
    PyTorch's) on the warm-up + cosine schedule, one learning rate and decoupled weight decay for every variable
    (solo-learn's ViT recipes: exclude_bias_n_norm_wd off). Adam divides the gradient by its own scale, so the official
    code's 1/R gradient takes (up to epsilon) the same step: reference_replicas is LARS's only and must stay 1."""
    o = config.optimizer
    if o.reference_replicas != 1:
        raise ValueError(f"config.optimizer.reference_replicas={o.reference_replicas} converts LARS hyperparameters "
                         "only; with optimizer.name='adamw' set it to 1.")
    logging.info("AdamW: lr %g, weight decay %g (every variable), betas 0.9/0.999, epsilon %g.",
                 o.lr_weights * scale, o.weight_decay, o.epsilon)
    return keras.optimizers.AdamW(_schedule(config, o.lr_weights * scale, steps_per_epoch),
                                  weight_decay=float(o.weight_decay), beta_1=0.9, beta_2=0.999,
                                  epsilon=float(o.epsilon), name="adamw")


def build_probe_optimizer(config, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The online probe's own optimizer, with the main schedule's shape peaking at `online_probe.lr` (x batch/256
    when the recipe scales). "lars": the main LARS rule (form, eta) with the probe's momentum, weight decay and one
    learning rate for its kernel and bias, i.e. solo-learn's classifier parameter group (solo/methods/base.py:
    `{"params": classifier, "lr": classifier_lr, "weight_decay": 0}` in the same LARS and scheduler). "sgd": momentum
    SGD (Keras's decoupled weight decay if any). "adamw": Keras's AdamW, the same group in solo-learn's ViT recipes."""
    p, o = config.online_probe, config.optimizer
    schedule = _schedule(config, p.lr * _lr_scale(config), steps_per_epoch)
    if p.optimizer == "lars":
        return optim.LARS(schedule, momentum=p.momentum, eta=o.eta, weight_decay=p.weight_decay, bias_lr_scale=1.0,
                          name="online_probe_lars", **_lars_form(o))
    if p.optimizer == "sgd":
        return keras.optimizers.SGD(schedule, momentum=p.momentum, weight_decay=p.weight_decay or None,
                                    name="online_probe_sgd")
    if p.optimizer == "adamw":  # solo-learn's classifier group in its AdamW (ViT recipes): lr classifier_lr, wd 0
        return keras.optimizers.AdamW(schedule, weight_decay=float(p.weight_decay), beta_1=0.9, beta_2=0.999,
                                      epsilon=float(o.epsilon), name="online_probe_adamw")
    raise ValueError(f"config.online_probe.optimizer must be 'sgd', 'lars' or 'adamw', got {p.optimizer!r}.")


def steps_per_epoch(config, info: sources.DatasetInfo) -> int:
    """`config.steps_per_epoch`, else the split's examples // the global batch (a clear error when that is 0)."""
    if config.steps_per_epoch:
        return int(config.steps_per_epoch)
    examples = info.splits.get(config.split)
    if not examples:
        raise ValueError(f"Dataset {config.dataset} has no examples in split {config.split!r}; "
                         f"its splits: {info.splits}.")
    steps = examples // config.batch_size
    if steps < 1:
        raise ValueError(f"config.batch_size={config.batch_size} is larger than the {examples} examples of "
                         f"{config.dataset}:{config.split}; lower it.")
    return steps


def build_training_model(config, run: RunData) -> BarlowTwins:
    """The model as pre-training runs it (call inside the strategy's scope): built under `config.precision`'s dtype
    policy (the process's global policy is left as it was), with the run's data (`build_model`), compiled with LARS
    (under mixed_float16 `BarlowTwins.compile` adds bt_keras's loss scaling), and the optimizer built on the
    pre-training variables (the online probe has its own). The trainer and `benchmarks/accelerator.py` both build
    through here."""
    with precision.policy_scope(config.precision):
        model = build_model(config, run)
        model.compile(optimizer=build_optimizer(config, run.steps_per_epoch), jit_compile=bool(config.jit_compile))
        model.optimizer.build(model.pretrain_variables)
    return model


def build_device_augment(config, views) -> device_augment.DeviceAugment | None:
    """The model's on-device colour steps when `config.augment_on == "accelerator"`, else None
    (`bt_keras.augment.device`)."""
    mode = device_augment.check_augment_on(config.augment_on)
    return device_augment.DeviceAugment(*views) if mode == "accelerator" else None
