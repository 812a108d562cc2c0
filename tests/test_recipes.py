"""Recipes reproduce what they cite: solo-learn's CIFAR recipe field by field and as built (LARS rule, schedule, loss
scale, network), and the ImageNet recipe's published hyperparameters converted to our true gradient by the builder."""

import importlib.util
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from bt_keras import data
from bt_keras.assembly import builders
from bt_keras.method import losses
from bt_keras.method.optim import LARS
from bt_keras.method.probe import OnlineProbe
from tests.helpers import REPO, numpy_lars, numpy_solo_lars

EXPERIMENTS = REPO / "experiments"


def recipe(name):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# (field, value, where solo-learn sets it) -- vturrisi/solo-learn at 9187ea3
SOLO_LEARN = [
    ("dataset", "tfds:cifar10", "scripts/pretrain/cifar/barlow.yaml data.dataset"),
    ("backbone", "resnet18", "barlow.yaml backbone.name"),
    ("stem", "cifar_pad2", "solo/methods/base.py: Conv2d(3, 64, 3, stride=1, padding=2), maxpool Identity"),
    ("zero_init_residual", False, "torchvision resnet18() default"),
    ("projector", "2048-2048-2048", "barlow.yaml proj_hidden_dim / proj_output_dim"),
    ("projector_bias", True, "solo/methods/barlow_twins.py nn.Linear"),
    ("lambd", 0.0051, "solo/methods/barlow_twins.py default lamb"),
    ("scale_loss", 0.1, "barlow.yaml method_kwargs.scale_loss"),
    ("batch_size", 256, "barlow.yaml optimizer.batch_size"),
    ("epochs", 1000, "barlow.yaml max_epochs"),
    ("optimizer.lr_weights", 0.3, "barlow.yaml optimizer.lr"),
    ("optimizer.lr_biases", 0.3, "one lr for every parameter group"),
    ("optimizer.scale_by_batch", False, "x 256 * 1 GPU / 256 = 1 (solo/args/pretrain.py)"),
    ("optimizer.momentum", 0.9, "solo/args/pretrain.py default"),
    ("optimizer.weight_decay", 1e-4, "barlow.yaml optimizer.weight_decay"),
    ("optimizer.eta", 0.02, "barlow.yaml optimizer.kwargs.eta"),
    ("optimizer.trust_ratio", "solo_learn", "solo/utils/lars.py"),
    ("optimizer.clip_lr", True, "barlow.yaml optimizer.kwargs.clip_lr"),
    ("optimizer.epsilon", 1e-8, "solo/utils/lars.py eps"),
    ("optimizer.warmup_epochs", 10, "solo/methods/base.py warmup_epochs default"),
    ("optimizer.warmup_start_lr", 3e-5, "solo/methods/base.py warmup_start_lr default"),
    ("optimizer.inclusive_warmup", True, "solo/utils/lr_scheduler.py"),
    ("optimizer.end_lr_scale", 0.0, "solo/methods/base.py min_lr default"),
    ("optimizer.reference_replicas", 1, "barlow.yaml devices: [0]"),
    ("online_probe.enabled", True, "solo/methods/base.py classifier"),
    ("online_probe.optimizer", "lars", "the classifier is a parameter group of the same LARS"),
    ("online_probe.lr", 0.1, "barlow.yaml optimizer.classifier_lr"),
    ("online_probe.weight_decay", 0.0, "solo/methods/base.py learnable_params"),
]


@pytest.mark.parametrize("field, value, source", SOLO_LEARN, ids=[f for f, _, _ in SOLO_LEARN])
def test_sololearn_recipe_has_solo_learns_value(field, value, source):
    config = recipe("cifar10_sololearn")
    got = config
    for part in field.split("."):
        got = got[part]
    assert got == value, source


def test_sololearn_views_are_solo_learns():
    config = recipe("cifar10_sololearn")
    for view, solarize in ((config.view1, 0.0), (config.view2, 0.2)):  # scripts/pretrain/cifar/augmentations/asym..
        assert tuple(view.crop_scale) == (0.08, 1.0) and view.flip_prob == 0.5 and view.grayscale_prob == 0.2
        assert (view.jitter_prob, view.brightness, view.contrast, view.saturation, view.hue) == (0.8, 0.4, 0.4, 0.2, 0.1)
        assert view.blur_prob == 0.0 and view.solarize_prob == solarize


def _small(config, dataset="digits"):
    """The recipe on a tiny network and the offline digits data, steps per epoch fixed: builders run in seconds."""
    config.dataset = dataset
    config.width_multiplier = 1 / 16
    config.blocks = (1, 1)
    config.projector = "32-32-32"
    config.steps_per_epoch = 195
    return config


def test_sololearn_optimizer_as_built_takes_solo_learns_step():
    config = recipe("cifar10_sololearn")
    config.steps_per_epoch = 195  # 50,000 // 256, drop_last (solo/data/pretrain_dataloader.py)
    opt = builders.build_optimizer(config, 195)
    assert (opt.trust_ratio, opt.clip_lr, opt.eta, opt.lars_weight_decay, opt.bias_lr_scale, opt.momentum) == \
        ("solo_learn", True, 0.02, 1e-4, 1.0, 0.9)
    schedule = opt._learning_rate
    assert float(schedule(0)) == pytest.approx(3e-5)  # the warm-up starts at 3e-5 ...
    assert float(schedule(1949)) == pytest.approx(0.3)  # ... reaches 0.3 on its last step (W - 1) ...
    assert float(schedule(195_000)) == 0.0  # ... and the cosine ends at 0
    # One float64 step of the built optimizer against the NumPy port of solo/utils/lars.py, at the schedule's lr.
    rng = np.random.default_rng(0)
    initial = [rng.normal(size=(3, 3, 3, 4)), rng.normal(size=(4,))]
    grads = [[rng.normal(size=w.shape) for w in initial]]
    variables = [keras.Variable(w) for w in initial]
    opt.apply_gradients([(tf.constant(g), v) for g, v in zip(grads[0], variables)])
    lr = float(np.float32(float(schedule(0))))
    want, branches = numpy_solo_lars(initial, grads, [lr], momentum=0.9, eta=0.02, wd=1e-4, eps=1e-8, clip_lr=True,
                                     exclude_bias_n_norm=True)
    assert branches[0] == ["clipped", "excluded"]  # at lr 3e-5 the ratio clips
    for v, w in zip(variables, want):
        np.testing.assert_allclose(v.numpy(), w, rtol=0, atol=1e-10)


def test_sololearn_model_as_built():
    config = _small(recipe("cifar10_sololearn"))
    model = builders.build_model(config, builders.run_data(config))
    stem = model.encoder.get_layer("stem_conv")
    assert stem.output.shape[1:3] == (34, 34)  # padding 2 on 32 px images
    residual_gammas = [layer.gamma.numpy() for layer in model.encoder.layers if layer.name.endswith("_bn2")]
    assert residual_gammas and all(np.all(g == 1.0) for g in residual_gammas)  # zero_init_residual=False
    dense = [layer for layer in model.projector.layers if isinstance(layer, keras.layers.Dense)]
    assert len(dense) == 3 and all(layer.use_bias for layer in dense)
    assert model.scale_loss == 0.1 and model.lambd == 0.0051
    probe = model.online_probe
    assert isinstance(probe, OnlineProbe) and probe.num_classes == 10
    assert isinstance(probe.optimizer, LARS) and probe.optimizer.trust_ratio == "solo_learn"
    assert probe.optimizer.lars_weight_decay == 0.0 and probe.optimizer.clip_lr
    assert float(probe.optimizer._learning_rate(1949)) == pytest.approx(0.1)
    # The official defaults are unchanged: zero-initialised residual branches, no projector biases, no probe.
    default_config = _small(recipe("cifar10_resnet18"))
    default = builders.build_model(default_config, builders.run_data(default_config))
    assert all(np.all(layer.gamma.numpy() == 0.0) for layer in default.encoder.layers if layer.name.endswith("_bn2"))
    assert not any(layer.use_bias for layer in default.projector.layers if isinstance(layer, keras.layers.Dense))
    assert default.online_probe is None and default.scale_loss == 1.0
    assert default.encoder.get_layer("stem_conv").output.shape[1:3] == (32, 32)


def numpy_solo_learn_loss(z1, z2, lamb, scale_loss):
    """solo/losses/barlow.py's barlow_loss_func on one device, float64, from its formulas."""
    def bn(z):  # BatchNorm1d(affine=False) in training mode: batch mean, biased variance, eps 1e-5
        return (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)

    corr = bn(z1).T @ bn(z2) / z1.shape[0]
    cdif = (corr - np.eye(corr.shape[0])) ** 2
    off = ~np.eye(corr.shape[0], dtype=bool)
    cdif[off] *= lamb
    return scale_loss * cdif.sum()


def test_scaled_loss_equals_solo_learns_loss_and_scales_the_gradient():
    config = _small(recipe("cifar10_sololearn"))
    config.online_probe.enabled = False
    keras.config.set_dtype_policy("float64")
    try:
        keras.utils.set_random_seed(0)
        scaled = builders.build_model(config)
        config.scale_loss = 1.0
        unscaled = builders.build_model(config)
    finally:
        keras.config.set_dtype_policy("float32")
    unscaled.set_weights(scaled.get_weights())
    rng = np.random.default_rng(0)
    v1, v2 = (tf.constant(rng.normal(size=(16, 32, 32, 3))) for _ in range(2))
    terms = scaled.compute_loss_terms(v1, v2, training=False)
    z1 = scaled.projector(scaled.encoder(v1, training=False), training=False).numpy()
    z2 = scaled.projector(scaled.encoder(v2, training=False), training=False).numpy()
    want = numpy_solo_learn_loss(z1, z2, 0.0051, 0.1)
    assert float(terms["loss"]) == pytest.approx(want, rel=1e-10)
    assert float(terms["loss"]) == pytest.approx(0.1 * float(losses.reference_loss(z1, z2, 0.0051)["loss"]), rel=1e-10)
    for model in (scaled, unscaled):
        model.compile(optimizer=LARS(0.1))
    grads_scaled, _ = scaled.compute_gradients(v1, v2)
    grads_unscaled, _ = unscaled.compute_gradients(v1, v2)
    scale = max(float(np.abs(g.numpy()).max()) for g in grads_unscaled)
    for a, b in zip(grads_scaled, grads_unscaled):  # (biases before a BN have a zero gradient, up to round-off)
        np.testing.assert_allclose(a.numpy(), 0.1 * b.numpy(), rtol=1e-9, atol=1e-12 * scale)


def test_imagenet_recipe_takes_the_official_16_gpu_step(caplog):
    """The builder turns the published (wd, lr_b) into (16 wd, lr_b / 16), logs it, and the built LARS's float64 step
    with the true gradient g equals the official step with g / 16 and the published values."""
    config = recipe("imagenet_resnet50")
    assert config.optimizer.reference_replicas == 16
    config.optimizer.warmup_epochs = 0  # so that step 0 has a learning rate
    with caplog.at_level(logging.INFO, logger="absl"):
        opt = builders.build_optimizer(config, steps_per_epoch=10)
    assert "16-GPU" in caplog.text and "2.4e-05" in caplog.text
    assert opt.lars_weight_decay == pytest.approx(16 * 1.5e-6)
    assert opt.bias_lr_scale == pytest.approx(0.0048 / 16 / 0.2)
    rng = np.random.default_rng(0)
    initial = [rng.normal(size=(3, 3, 4, 6)), rng.normal(size=(8, 5)), rng.normal(size=(6,))]
    grads = [rng.normal(size=w.shape) for w in initial]
    variables = [keras.Variable(w) for w in initial]
    lr = float(np.float32(float(opt.learning_rate)))
    opt.apply_gradients([(tf.constant(g), v) for g, v in zip(grads, variables)])
    official = numpy_lars(initial, [[g / 16 for g in grads]], lr=lr, momentum=0.9, eta=0.001, wd=1.5e-6,
                          bias_lr_scale=0.0048 / 0.2)
    for v, w in zip(variables, official):
        np.testing.assert_allclose(v.numpy(), w, rtol=0, atol=1e-12)


def test_reference_replicas_refuses_the_solo_learn_form():
    config = recipe("cifar10_sololearn")
    config.optimizer.reference_replicas = 4
    with pytest.raises(ValueError, match="reference_replicas=4 converts the official LARS form only"):
        builders.build_optimizer(config, steps_per_epoch=10)


def test_vit_recipe_optimizer_as_built_takes_torch_adamws_step():
    """The ViT-S recipe's AdamW (solo-learn's mocov3_vit.yaml: lr 3e-4 x 1024/256, wd 0.1 on every parameter, warm-up
    from 3e-5 over 10 epochs, cosine to 0): its schedule, and one float64 step against torch.optim.AdamW's update."""
    config = recipe("imagenet_vit_small")
    opt = builders.build_optimizer(config, steps_per_epoch=100)
    assert isinstance(opt, keras.optimizers.AdamW)
    assert (opt.weight_decay, opt.beta_1, opt.beta_2, opt.epsilon) == (0.1, 0.9, 0.999, 1e-8)
    schedule = opt._learning_rate
    assert float(schedule(0)) == pytest.approx(3e-5)
    assert float(schedule(999)) == pytest.approx(1.2e-3)  # 3e-4 x 1024 / 256 at the warm-up's last step
    assert float(schedule(400 * 100)) == 0.0
    probe = builders.build_probe_optimizer(config, steps_per_epoch=100)
    assert isinstance(probe, keras.optimizers.AdamW) and probe.weight_decay == 0.0
    assert float(probe._learning_rate(999)) == pytest.approx(1.2e-3)
    rng = np.random.default_rng(0)
    initial = [rng.normal(size=(3, 4)), rng.normal(size=(4,))]
    grads = [rng.normal(size=w.shape) for w in initial]
    variables = [keras.Variable(w) for w in initial]
    lr = float(np.float32(float(schedule(0))))
    opt.apply_gradients([(tf.constant(g), v) for g, v in zip(grads, variables)])
    for v, w, g in zip(variables, initial, grads):  # torch.optim.AdamW, step 1: decay, then the bias-corrected step
        m_hat, v_hat = 0.1 * g / (1 - 0.9), 0.001 * g * g / (1 - 0.999)
        want = w * (1 - lr * 0.1) - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
        # a step of ~3e-5 per element, equal to 3e-10 (Keras keeps the learning rate in float32)
        np.testing.assert_allclose(v.numpy(), want, rtol=0, atol=1e-9)
    config.optimizer.reference_replicas = 8
    with pytest.raises(ValueError, match="reference_replicas=8 converts LARS hyperparameters only"):
        builders.build_optimizer(config, steps_per_epoch=100)
    config.optimizer.name = "sgd"
    with pytest.raises(ValueError, match="must be 'lars' or 'adamw'"):
        builders.build_optimizer(config, steps_per_epoch=100)
    from bt_keras.train import preflight

    assert [p for p in preflight.config_problems(config) if p.startswith("config.optimizer.name='sgd' must be")]


def test_old_cifar_recipe_keeps_the_official_form():
    config = recipe("cifar10_resnet18")
    opt = builders.build_optimizer(config, steps_per_epoch=195)
    assert (opt.trust_ratio, opt.clip_lr) == ("official", False)
    assert opt.bias_lr_scale == pytest.approx(0.0048 / 0.2) and opt.lars_weight_decay == 1e-4
    assert float(opt._learning_rate(0)) == 0.0


def test_online_probe_is_off_when_the_dataset_has_no_labels(caplog):
    config = _small(recipe("cifar10_sololearn"))
    info = data.dataset_info(config.dataset, config.data_dir)
    assert builders.online_probe_classes(config, info) == 10
    unlabelled = data.DatasetInfo(info.name, 0, info.image_shape, info.splits, info.mean, info.std)
    with caplog.at_level(logging.WARNING, logger="absl"):
        assert builders.online_probe_classes(config, unlabelled) == 0
    assert "Online probe off" in caplog.text


RECIPES = sorted(p.stem for p in EXPERIMENTS.glob("*.py") if "def get_config" in p.read_text())
# imagenet_vit_small's two steps, as shipped with the same tiny ViT and the same settings as below, are
# tests/nets/test_vit.py's test_the_shipped_recipe_trains_two_steps_with_a_tiny_vit_and_its_encoder_reloads, which
# also checks its AdamW and its saved encoder: not run twice.
TRAINED_ELSEWHERE = {"imagenet_vit_small"}


def test_every_recipe_is_trained_here_or_in_test_vit():
    assert "imagenet_vit_small" in RECIPES and TRAINED_ELSEWHERE <= set(RECIPES)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(RECIPES) - TRAINED_ELSEWHERE))
def test_every_shipped_recipe_trains_two_steps(name, tmp_path):
    """Each recipe in experiments/ as shipped (its views, optimizer and schedule, probe, loss scale, precision
    fields), with a tiny network, batch 16 and two steps, trains through the Trainer with finite losses. The
    recipes' own data where it is offline (CIFAR-10 from ../shared/tfds, the quickstart's canvases); the ImageNet
    recipe at 32 px on CIFAR-10, ImageNet not being here."""
    from bt_keras.train.trainer import Trainer
    from tests.helpers import TFDS_DIR

    config = recipe(name)
    if config.dataset != "cluttered_digits" and not (TFDS_DIR / "cifar10").is_dir():
        pytest.skip(f"no CIFAR-10 at {TFDS_DIR}")
    if config.dataset.startswith("tfds:"):
        config.dataset, config.data_dir, config.download = "tfds:cifar10", str(TFDS_DIR), False
        config.image_size = 32
    config.width_multiplier = 1 / 16
    if config.backbone.startswith("resnet"):
        config.blocks = (1, 1)
    config.projector = "-".join(["64"] * len(config.projector.split("-")))  # the recipe's depth, 64 wide
    config.batch_size, config.epochs, config.steps_per_epoch = 16, 1, 2
    config.knn.every_epochs, config.knn.baselines = 0, False
    config.picture_every_epochs, config.report = 0, False  # no figures: no test here reads them
    trainer = Trainer(config, tmp_path / name, tf.distribute.get_strategy())
    logs = trainer.run()
    assert trainer.step == 2 and np.isfinite(logs["loss"]), logs
