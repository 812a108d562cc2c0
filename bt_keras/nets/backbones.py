"""ResNet encoders for Barlow Twins, as torchvision builds them, with the options self-supervised training needs.

* `resnet50`: the paper's backbone (2048-d features after global average pooling), torchvision's "v1.5" layout
  (stride on the 3x3 convolution of a bottleneck).
* `resnet18` / `resnet34`: 512-d; with `stem="cifar"` the first layer is a 3x3 stride-1 convolution and the max-pool
  is dropped, the usual variant for 32 px images. `stem="cifar_pad2"` is solo-learn's exact stem
  (solo/methods/base.py: `nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)`, PyTorch's default
  init): 2 px of zero padding make 34 x 34 maps from 32 px images (17, 9, 5 in the later stages).
* `zero_init_residual=True` (the official code's torchvision flag): the last BatchNorm's gamma in each residual
  branch starts at zero, so every block starts as the identity.
* `synchronized_bn=True`: BatchNorm statistics over the global batch under `tf.distribute`, so N replicas train
  exactly as one device (the official code converts to SyncBatchNorm for the same reason).

Weights are randomly initialised (Kaiming normal, fan-out, as torchvision); there is nothing to download.

Any other Keras network is a backbone too, named `MODULE:CALLABLE` (`foreign_backbone`), e.g.
`keras.applications:ConvNeXtTiny`; its BatchNorm layers become this package's, synchronised as asked.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import keras

from bt_keras.nets.batch_norm import BatchNormalization, as_bt_keras_batch_norm

_STAGE_WIDTHS = (64, 128, 256, 512)
STEMS = ("imagenet", "cifar", "cifar_pad2")
_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}
_BOTTLENECK = {"resnet18": False, "resnet34": False, "resnet50": True}


def _kaiming():
    """torchvision's conv init (Kaiming normal, fan-out). A new instance per layer: a Keras initializer draws its
    seed when constructed, so one shared instance would give every same-shaped kernel the same values, and a
    module-level one would ignore `keras.utils.set_random_seed`."""
    return keras.initializers.VarianceScaling(scale=2.0, mode="fan_out", distribution="untruncated_normal")


class _Builder:
    """Holds the options shared by every layer of one network, so the block functions stay short."""

    def __init__(self, synchronized_bn: bool, zero_init_residual: bool):
        self.synchronized_bn = synchronized_bn
        self.zero_init_residual = zero_init_residual

    def conv(self, x, filters, kernel, stride, name):
        if stride > 1 and kernel > 1:  # torch-style symmetric padding, not TF's "same" (which pads bottom/right).
            x = keras.layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
            padding = "valid"
        else:
            padding = "same"
        return keras.layers.Conv2D(
            filters, kernel, stride, padding=padding, use_bias=False, kernel_initializer=_kaiming(), name=name
        )(x)

    def bn(self, x, name, last_in_branch=False):
        gamma = "zeros" if (last_in_branch and self.zero_init_residual) else "ones"
        return BatchNormalization(
            momentum=0.9, epsilon=1e-5, gamma_initializer=gamma, synchronized=self.synchronized_bn, name=name
        )(x)

    def shortcut(self, x, filters, stride, name):
        if stride == 1 and x.shape[-1] == filters:
            return x
        return self.bn(self.conv(x, filters, 1, stride, f"{name}_down_conv"), f"{name}_down_bn")

    def basic_block(self, x, filters, stride, name):
        shortcut = self.shortcut(x, filters, stride, name)
        y = keras.layers.ReLU()(self.bn(self.conv(x, filters, 3, stride, f"{name}_conv1"), f"{name}_bn1"))
        y = self.bn(self.conv(y, filters, 3, 1, f"{name}_conv2"), f"{name}_bn2", last_in_branch=True)
        return keras.layers.ReLU(name=f"{name}_out")(keras.layers.Add()([shortcut, y]))

    def bottleneck_block(self, x, filters, stride, name):
        shortcut = self.shortcut(x, 4 * filters, stride, name)
        y = keras.layers.ReLU()(self.bn(self.conv(x, filters, 1, 1, f"{name}_conv1"), f"{name}_bn1"))
        y = keras.layers.ReLU()(self.bn(self.conv(y, filters, 3, stride, f"{name}_conv2"), f"{name}_bn2"))
        y = self.bn(self.conv(y, 4 * filters, 1, 1, f"{name}_conv3"), f"{name}_bn3", last_in_branch=True)
        return keras.layers.ReLU(name=f"{name}_out")(keras.layers.Add()([shortcut, y]))


def resnet(
    depth_name: str,
    *,
    input_shape=(224, 224, 3),
    stem: str = "imagenet",
    width_multiplier: float = 1.0,
    blocks: tuple[int, ...] | None = None,
    zero_init_residual: bool = True,
    synchronized_bn: bool = True,
    name: str | None = None,
) -> keras.Model:
    """Builds a ResNet encoder mapping normalised NHWC float images to pooled features.

    Args:
      depth_name: "resnet18", "resnet34" or "resnet50".
      input_shape: (height, width, channels); height/width may be None for any size.
      stem: "imagenet" (7x7 stride-2 conv + 3x3 stride-2 max-pool), "cifar" (3x3 stride-1 conv, no pool) or
        "cifar_pad2" (the same with 2 px of zero padding and PyTorch's default conv init: solo-learn's).
      width_multiplier: scales every stage's width (1.0 is the standard network; small values make tiny test nets).
      blocks: residual blocks per stage, overriding the depth's standard (2, 2, 2, 2) / (3, 4, 6, 3); 1 to 4 stages.
        With width_multiplier, this makes the small, fast networks of tests and the offline demo.
      zero_init_residual: start each residual branch's last BN gamma at zero (official code: True).
      synchronized_bn: global-batch BN statistics under tf.distribute.
      name: the model's name (default: depth_name).

    Example:
      >>> encoder = resnet("resnet18", input_shape=(32, 32, 3), stem="cifar")
      >>> encoder.output_shape
      (None, 512)
    """
    if depth_name not in _BLOCKS:
        raise ValueError(f"Unknown ResNet {depth_name!r}; choose one of {sorted(_BLOCKS)}.")
    if stem not in STEMS:
        raise ValueError(f"Unknown stem {stem!r}; choose 'imagenet' (7x7/2 + max-pool), 'cifar' (3x3/1) or "
                         "'cifar_pad2' (3x3/1 with 2 px of padding, solo-learn's).")
    if width_multiplier <= 0:
        raise ValueError(f"width_multiplier must be positive, got {width_multiplier}.")
    blocks = tuple(blocks) if blocks is not None else _BLOCKS[depth_name]
    if not 1 <= len(blocks) <= 4 or any(int(b) < 1 for b in blocks):
        raise ValueError(f"blocks must list 1 to 4 stages of at least one block each, got {blocks}.")

    build = _Builder(synchronized_bn, zero_init_residual)
    widths = [max(1, int(round(w * width_multiplier))) for w in _STAGE_WIDTHS]
    inputs = keras.Input(shape=input_shape, name="images")
    if stem == "imagenet":
        x = build.conv(inputs, widths[0], 7, 2, "stem_conv")
        x = keras.layers.ReLU(name="stem_relu")(build.bn(x, "stem_bn"))
        x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
        x = keras.layers.MaxPooling2D(3, 2, name="stem_pool")(x)
    elif stem == "cifar_pad2":
        x = keras.layers.ZeroPadding2D(2, name="stem_pad")(inputs)
        # solo-learn replaces torchvision's conv1 after torchvision's init: PyTorch's default, U(+-1/sqrt(fan_in)).
        torch_default = keras.initializers.VarianceScaling(scale=1 / 3, mode="fan_in", distribution="uniform")
        x = keras.layers.Conv2D(widths[0], 3, 1, padding="valid", use_bias=False, kernel_initializer=torch_default,
                                name="stem_conv")(x)
        x = keras.layers.ReLU(name="stem_relu")(build.bn(x, "stem_bn"))
    else:
        x = build.conv(inputs, widths[0], 3, 1, "stem_conv")
        x = keras.layers.ReLU(name="stem_relu")(build.bn(x, "stem_bn"))

    block = build.bottleneck_block if _BOTTLENECK[depth_name] else build.basic_block
    for stage, (filters, stage_blocks) in enumerate(zip(widths, blocks)):
        for i in range(stage_blocks):
            stride = 2 if (i == 0 and stage > 0) else 1
            x = block(x, filters, stride, f"stage{stage + 1}_block{i + 1}")
    features = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, features, name=name or depth_name)


def resnet18(**kwargs) -> keras.Model:
    """ResNet-18 (512-d features). Keyword arguments as `resnet`."""
    return resnet("resnet18", **kwargs)


def resnet34(**kwargs) -> keras.Model:
    """ResNet-34 (512-d features). Keyword arguments as `resnet`."""
    return resnet("resnet34", **kwargs)


def resnet50(**kwargs) -> keras.Model:
    """ResNet-50 (2048-d features), the paper's backbone. Keyword arguments as `resnet`."""
    return resnet("resnet50", **kwargs)


# ------------------------------------------------------------------ small CNN (the digits quickstart, issue 16)

_SMALL_CNN_WIDTHS = (32, 64, 128)


def small_cnn(*, input_shape=(32, 32, 3), width_multiplier: float = 1.0, synchronized_bn: bool = True,
              stem: str | None = None, blocks=None, zero_init_residual: bool = False, pooling: str = "avg",
              name: str = "small_cnn") -> keras.Model:
    """Three 3x3 conv -> BatchNorm -> ReLU -> 2x2 max-pool layers (32, 64, 128 channels x `width_multiplier`), then
    `pooling`: "avg" (global average pooling, 128-d; the default, the digits quickstart's) or "flatten" (4 x 4 x 128 =
    2048-d at 32 px; a fixed input size is needed). Sized for 32 px images of simple data, where a ResNet is slower. Flattening keeps where the strokes are, so on the digits even the random network's flattened features
    are strong (kNN 0.967 at random init, 0.978 trained); pooled ones start at 0.925 and reach 0.975 after the
    quickstart's training. `stem` and `zero_init_residual` are ResNet options and are ignored (no stem, no residual
    branch); `blocks` must be unset.
    """
    if pooling not in ("flatten", "avg"):
        raise ValueError(f"small_cnn: pooling must be 'flatten' or 'avg', got {pooling!r}.")
    if pooling == "flatten" and any(d is None for d in input_shape[:2]):
        raise ValueError(f"small_cnn(pooling='flatten') needs a fixed image size (it flattens its last feature map), "
                         f"got {input_shape}.")
    if blocks:
        raise ValueError(f"small_cnn has no residual blocks: leave config.blocks unset (got {blocks}).")
    if width_multiplier <= 0:
        raise ValueError(f"width_multiplier must be positive, got {width_multiplier}.")
    build = _Builder(synchronized_bn, zero_init_residual=False)
    x = inputs = keras.Input(shape=input_shape, name="images")
    for i, width in enumerate(_SMALL_CNN_WIDTHS):
        x = build.conv(x, max(1, int(round(width * width_multiplier))), 3, 1, f"conv{i + 1}")
        x = keras.layers.ReLU(name=f"relu{i + 1}")(build.bn(x, f"bn{i + 1}"))
        x = keras.layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    if pooling == "avg":
        features = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    else:
        features = keras.layers.Flatten(name="flatten")(x)
    return keras.Model(inputs, features, name=name)


# ---------------------------------------------------------------------------------------------- registry

BACKBONES: dict[str, Callable[..., keras.Model]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "small_cnn": small_cnn,
}


# ------------------------------------------------------------------------- any Keras network: MODULE:CALLABLE

# What a `keras.applications` callable is given unless config.backbone_options says otherwise: random weights (no
# download; pre-training starts from scratch), no classifier, globally average-pooled features [batch, D].
KERAS_APPLICATIONS_DEFAULTS = {"weights": None, "include_top": False, "pooling": "avg"}


def is_foreign(name) -> bool:
    """True for a `MODULE:CALLABLE` backbone name (any Keras network), False for a name of `BACKBONES`."""
    return isinstance(name, str) and ":" in name


def foreign_callable(name: str) -> Callable[..., keras.Model]:
    """The callable `MODULE:CALLABLE` names (CALLABLE may be dotted: `module:Class.from_preset`). Raises ValueError
    in one line naming config.backbone when the module does not import or has no such callable."""
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"config.backbone={name!r} is not MODULE:CALLABLE (e.g. 'keras.applications:ConvNeXtTiny'); "
                         f"or use one of {sorted(BACKBONES)}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"config.backbone={name!r}: module {module_name!r} does not import ({error}); install it "
                         "or fix the module name.") from None
    try:
        factory = functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        raise ValueError(f"config.backbone={name!r}: {module_name} has no {attribute!r}; check the spelling (e.g. "
                         "'keras.applications:ResNet50V2').") from None
    if not callable(factory):
        raise ValueError(f"config.backbone={name!r}: {module_name}.{attribute} is not callable; name a function or "
                         "class that returns a Keras model.")
    return factory


def foreign_backbone(name: str, *, input_shape, synchronized_bn: bool = True, **options) -> keras.Model:
    """Builds `MODULE:CALLABLE(input_shape=input_shape, **options)`, any Keras network of images -> features.

    For `keras.applications` callables the options default to KERAS_APPLICATIONS_DEFAULTS (weights=None,
    include_top=False, pooling="avg"); `options` (config.backbone_options) override them, e.g.
    `{"alpha": 0.75, "minimalistic": True}` for MobileNetV3Small, `{"include_preprocessing": False}` to drop its
    rescaling layer.

    The result must be a functional Keras model whose output is 2-D, [batch, features]; anything else is refused in
    one line naming config.backbone / config.backbone_options. Its BatchNormalization layers are Keras's, which under
    MirroredStrategy compute each replica's statistics (so N replicas would not train as one device): they are
    replaced by bt_keras's (`batch_norm.as_bt_keras_batch_norm`, same config and weights) with
    `synchronized=synchronized_bn`, which makes N replicas exact and keeps the fused kernel on one. ResNet options
    (stem, width_multiplier, blocks, zero_init_residual) do not apply to foreign networks and are not passed.
    """
    factory = foreign_callable(name)
    module_name = name.partition(":")[0]
    defaults = KERAS_APPLICATIONS_DEFAULTS if module_name.split(".")[:2] == ["keras", "applications"] else {}
    options = {**defaults, **options}
    try:
        model = factory(input_shape=tuple(input_shape), **options)
    except ImportError as error:  # an optional dependency imported when called (bt_keras.nets.vit: KerasHub)
        message = " ".join(str(error).split())
        raise ValueError(f"config.backbone={name!r}: {message}") from None
    except (TypeError, ValueError) as error:
        message = " ".join(str(error).split())
        raise ValueError(f"config.backbone={name!r} with input_shape={tuple(input_shape)} and "
                         f"config.backbone_options={options} fails: {message}") from None
    if not isinstance(model, keras.Model):
        raise ValueError(f"config.backbone={name!r} returned a {type(model).__name__}, not a keras.Model; name a "
                         "callable that builds a Keras model of images -> features.")
    try:
        output_shape = tuple(model.output_shape)
    except (AttributeError, ValueError):
        output_shape = None
    if output_shape is None or len(output_shape) != 2:
        raise ValueError(f"config.backbone={name!r} outputs shape {output_shape}, not [batch, features]: pool it "
                         "(config.backbone_options={'pooling': 'avg'} for keras.applications, include_top=False).")
    return as_bt_keras_batch_norm(model, synchronized=synchronized_bn)


def get_backbone(name: str, **kwargs) -> keras.Model:
    """Builds a backbone by name, e.g. `get_backbone("resnet18", stem="cifar", input_shape=(32, 32, 3))`, or a
    foreign one, `get_backbone("keras.applications:ResNet50V2", input_shape=(32, 32, 3))` (`foreign_backbone`)."""
    if is_foreign(name):
        return foreign_backbone(name, **kwargs)
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; registered backbones: {sorted(BACKBONES)}, or any Keras "
                         "network as MODULE:CALLABLE (e.g. 'keras.applications:ConvNeXtTiny').")
    try:
        return BACKBONES[name](**kwargs)
    except TypeError as error:  # e.g. config.backbone_options meant for another backbone
        if "unexpected keyword argument" not in str(error):
            raise
        option = str(error).rsplit("argument", 1)[-1].strip(" '\"")
        raise ValueError(f"Backbone {name!r} takes no option {option} (from config.backbone_options?); remove it "
                         "or pick the backbone it belongs to.") from None
