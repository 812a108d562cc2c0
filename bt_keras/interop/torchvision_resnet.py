"""A torchvision ResNet-18/34/50 state dict mapped onto `bt_keras.nets.backbones.resnet`, every key used exactly once.

torchvision's names (torchvision/models/resnet.py) and ours (bt_keras/nets/backbones.py):

    conv1, bn1                                  stem_conv, stem_bn
    layer{S}.{B}.conv{i}, layer{S}.{B}.bn{i}    stage{S}_block{B+1}_conv{i}, stage{S}_block{B+1}_bn{i}
    layer{S}.{B}.downsample.0 / .1              stage{S}_block{B+1}_down_conv / _down_bn

The architectures agree: v1.5 bottlenecks (stride on the 3x3 convolution), a 1x1-conv + BN downsample branch on the
first block of stages 2-4 (and of stage 1 in a ResNet-50, where the width changes), BatchNorm epsilon 1e-5, and
torch's symmetric zero padding (ours pads explicitly before every strided convolution; a stride-1 "same" padding
is symmetric for odd kernels). The ImageNet stem's max-pool pads with zeros rather than -inf, the same here
because it follows a ReLU. Weights: a conv kernel O x I x H x W becomes H x W x I x O; a BatchNorm's weight,
bias, running_mean, running_var become gamma, beta, moving_mean, moving_variance (`num_batches_tracked`, a counter
without a Keras counterpart, is accepted and not used).

The CIFAR stem (3x3 stride-1 conv1, no max-pool) is found from conv1's shape. Its padding is not in a state dict:
torchvision-style code (lightly, most CIFAR ResNets, and ours) pads it by 1, solo-learn by 2
(`nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2)`, which makes a 32 px image 34 px); pass
`cifar_stem_padding=2` for solo-learn checkpoints, and the encoder zero-pads its input by one more pixel.

Keys may carry a prefix: `module.` (DistributedDataParallel), `backbone.` (a Lightning / solo-learn module),
`module.backbone.` (the official Barlow Twins full checkpoint). Keys outside the chosen prefix (projector,
classifier, ...) are other modules of a full checkpoint and are left out (and reported); under it, a key that the
architecture does not use, a missing key or a wrong shape is a `ConversionError` listing all of them.
"""

from __future__ import annotations

import dataclasses
import re

import keras
import numpy as np

from bt_keras.nets import backbones

# (bottleneck blocks?, blocks per stage), torchvision's definitions
ARCHITECTURES = {"resnet18": (False, (2, 2, 2, 2)), "resnet34": (False, (3, 4, 6, 3)),
                 "resnet50": (True, (3, 4, 6, 3))}
PREFIXES = ("module.backbone.", "backbone.", "module.", "")
STEMS = ("imagenet", "cifar")
_BN_PARAMS = ("weight", "bias", "running_mean", "running_var")  # Keras order: gamma, beta, moving mean, variance
_COUNTER = "num_batches_tracked"
_MAX_LISTED = 6


class ConversionError(ValueError):
    """A state dict that does not fit the requested architecture; the message lists every offending key."""


@dataclasses.dataclass
class Inspection:
    """What a state dict holds: its backbone keys (prefix stripped) and the architecture they imply."""

    prefix: str
    keys: dict[str, np.ndarray]  # backbone keys, without the prefix, minus ignored ones
    left_out: list[str]  # keys outside the prefix
    ignored: list[str]  # keys dropped by `ignore`
    backbone: str | None  # resnet18 / resnet34 / resnet50, or None when the blocks fit none
    stem: str | None
    bottleneck: bool
    blocks: tuple[int, ...]

    def describe(self) -> str:
        kind = "bottleneck" if self.bottleneck else "basic"
        name = self.backbone or "ResNet of no supported depth"
        return f"{name} ({kind} blocks {self.blocks}, {self.stem or 'unknown'} stem)"


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _dims(shape) -> str:
    return "x".join(str(int(n)) for n in shape) or "scalar"


def _choose_prefix(state: dict, prefix: str | None) -> str:
    if prefix is not None:
        if f"{prefix}conv1.weight" not in state:
            raise ConversionError(f"No key {prefix}conv1.weight in the state dict (prefix {prefix!r} given); its "
                                  f"first keys are {_listing(sorted(state))}.")
        return prefix
    found = [p for p in PREFIXES if f"{p}conv1.weight" in state]
    if not found:
        raise ConversionError(
            f"No torchvision ResNet in the state dict: none of {[p + 'conv1.weight' for p in PREFIXES]} is a key. "
            f"Its first keys are {_listing(sorted(state))}; if the ResNet sits under another prefix, pass it "
            "(--prefix=NAME.).")
    if len(found) > 1:
        raise ConversionError(f"The state dict holds a ResNet under several prefixes {found}; pass the one to "
                              "convert (--prefix=...).")
    return found[0]


def inspect_state_dict(state: dict[str, np.ndarray], prefix: str | None = None, ignore=()) -> Inspection:
    """Strips the prefix (given, or the one of PREFIXES under which `conv1.weight` is found), drops `ignore`d
    modules (e.g. `("fc",)`: `fc.weight`, `fc.bias`), and infers depth and stem from the keys and shapes."""
    prefix = _choose_prefix(state, prefix)
    left_out = sorted(k for k in state if not k.startswith(prefix))
    keys, ignored = {}, []
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if any(name == m or name.startswith(f"{m}.") for m in ignore):
            ignored.append(name)
        else:
            keys[name] = value
    per_stage: dict[int, int] = {}
    for name in keys:
        match = re.match(r"layer(\d+)\.(\d+)\.", name)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            per_stage[stage] = max(per_stage.get(stage, 0), block + 1)
    blocks = tuple(per_stage.get(s, 0) for s in range(1, max(per_stage, default=0) + 1))
    bottleneck = any(re.fullmatch(r"layer\d+\.\d+\.conv3\.weight", name) for name in keys)
    backbone = next((n for n, arch in ARCHITECTURES.items() if arch == (bottleneck, blocks)), None)
    kernel = tuple(np.shape(keys["conv1.weight"]))[2:]
    stem = {(7, 7): "imagenet", (3, 3): "cifar"}.get(kernel)
    return Inspection(prefix, keys, left_out, sorted(ignored), backbone, stem, bottleneck, blocks)


def torch_module_name(keras_layer: str) -> str:
    """Our layer name -> torchvision's module name, e.g. stage2_block1_down_conv -> layer2.0.downsample.0."""
    if keras_layer in ("stem_conv", "stem_bn"):
        return {"stem_conv": "conv1", "stem_bn": "bn1"}[keras_layer]
    match = re.fullmatch(r"stage(\d+)_block(\d+)_(conv\d|bn\d|down_conv|down_bn)", keras_layer)
    if not match:
        raise ValueError(f"No torchvision counterpart for the layer {keras_layer!r}.")
    stage, block, part = match.group(1), int(match.group(2)) - 1, match.group(3)
    part = {"down_conv": "downsample.0", "down_bn": "downsample.1"}.get(part, part)
    return f"layer{stage}.{block}.{part}"


def _plan(encoder: keras.Model) -> list[tuple[keras.layers.Layer, list[tuple[str, tuple]]]]:
    """For each weighted layer: the torch keys of its variables in Keras order, with the torch shapes they need."""
    plan = []
    for layer in encoder.layers:
        if not layer.weights:
            continue
        module = torch_module_name(layer.name)
        if isinstance(layer, keras.layers.Conv2D):
            if layer.use_bias:
                raise ValueError(f"{layer.name} has a bias; torchvision's ResNet convolutions have none.")
            h, w, i, o = layer.kernel.shape
            plan.append((layer, [(f"{module}.weight", (o, i, h, w))]))
        elif isinstance(layer, keras.layers.BatchNormalization):
            if not (layer.scale and layer.center) or abs(layer.epsilon - 1e-5) > 1e-12:
                raise ValueError(f"{layer.name} is not a torch BatchNorm2d (scale, center, epsilon 1e-5).")
            channels = (int(layer.moving_mean.shape[0]),)
            plan.append((layer, [(f"{module}.{p}", channels) for p in _BN_PARAMS]))
        else:
            raise ValueError(f"Layer {layer.name} ({type(layer).__name__}) has weights and no torchvision mapping.")
    return plan


def _check(inspection: Inspection, plan, backbone: str, stem: str) -> None:
    """Raises ConversionError listing missing / unexpected keys and wrong shapes (all of them, in one message)."""
    keys = inspection.keys
    expected = {key: shape for _, entries in plan for key, shape in entries}
    counters = {key.rsplit(".", 1)[0] + f".{_COUNTER}" for key in expected if key.endswith(".running_mean")}
    missing = [k for k in expected if k not in keys]
    unexpected = sorted(k for k in keys if k not in expected and k not in counters)
    wrong = [f"{k} is {_dims(np.shape(keys[k]))} ({backbone}: {_dims(shape)})"
             for k, shape in expected.items() if k in keys and tuple(np.shape(keys[k])) != shape]
    bad_values = []
    for key in expected:
        value = keys.get(key)
        if value is None or tuple(np.shape(value)) != expected[key]:
            continue
        if not np.issubdtype(value.dtype, np.floating):
            bad_values.append(f"{key} is {value.dtype}, not floating point")
        elif not np.all(np.isfinite(value)):
            bad_values.append(f"{key} holds NaN or infinity")
        elif key.endswith(".running_var") and np.any(value < 0):  # sqrt(var + eps) would be NaN
            bad_values.append(f"{key} holds negative values (a variance is >= 0)")
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_listing(unexpected)})")
    if missing:
        problems.append(f"{len(missing)} missing keys ({_listing(missing)})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches ({_listing(wrong)})")
    if bad_values:
        problems.append(f"{len(bad_values)} unusable tensors ({_listing(bad_values)})")
    if not problems:
        return
    hints = []
    if inspection.backbone and (inspection.backbone, inspection.stem) != (backbone, stem):
        hints.append(f"the file looks like a {inspection.describe()}: pass --backbone={inspection.backbone}"
                     + (f" --stem={inspection.stem}" if inspection.stem and inspection.stem != stem else ""))
    elif not inspection.backbone:
        hints.append(f"the file holds a {inspection.describe()}; supported are {sorted(ARCHITECTURES)}")
    if any(k.startswith("fc.") for k in unexpected):
        hints.append("fc.* is a classifier head: pass --ignore_keys=fc to drop it")
    where = f" (keys under {inspection.prefix!r})" if inspection.prefix else ""
    raise ConversionError(f"The state dict{where} does not fit torchvision's {backbone} with the {stem} stem: "
                          + "; ".join(problems) + (". Hint: " + "; ".join(hints) if hints else "") + ".")


def build_encoder(state: dict[str, np.ndarray], backbone: str | None = None, stem: str | None = None, *,
                  cifar_stem_padding: int = 1, prefix: str | None = None, ignore=(), synchronized_bn: bool = True,
                  name: str | None = None) -> tuple[keras.Model, dict]:
    """A bt_keras ResNet encoder (any input size, NHWC, 2048-/512-d pooled features) holding `state`'s weights.

    Args:
      state: a torchvision ResNet state dict as NumPy arrays (e.g. `torch_file.load_state_dict(path)`).
      backbone: "resnet18" / "resnet34" / "resnet50"; default: inferred from the keys (bottleneck or basic blocks,
        blocks per stage).
      stem: "imagenet" or "cifar"; default: from conv1's kernel (7x7 or 3x3).
      cifar_stem_padding: the CIFAR stem's conv1 padding, 1 (torchvision style, ours) or 2 (solo-learn).
      prefix: the keys' prefix; default: whichever of PREFIXES holds `conv1.weight`.
      ignore: module names under the prefix to drop, e.g. ("fc",) for a supervised classifier's head.
      synchronized_bn: as `backbones.resnet` (matters only when the encoder is fine-tuned under tf.distribute).
      name: the model's name (default: the backbone's).

    Returns `(encoder, report)`; `report` says what was converted (backbone, stem, prefix, key counts, dtypes,
    left-out and ignored keys). Raises ConversionError naming every missing / unexpected key and wrong shape.
    """
    inspection = inspect_state_dict(state, prefix=prefix, ignore=ignore)
    backbone = backbone or inspection.backbone
    if backbone is None:
        raise ConversionError(f"Cannot tell the depth: the state dict holds a {inspection.describe()}; supported "
                              f"are {sorted(ARCHITECTURES)} (pass --backbone to force one).")
    if backbone not in ARCHITECTURES:
        raise ConversionError(f"Unknown backbone {backbone!r}; choose one of {sorted(ARCHITECTURES)}.")
    stem = stem or inspection.stem
    if stem not in STEMS:
        raise ConversionError(f"Cannot tell the stem from conv1.weight of shape "
                              f"{list(np.shape(inspection.keys['conv1.weight']))} (want a 7x7 ImageNet or 3x3 CIFAR "
                              f"kernel); pass --stem, one of {list(STEMS)}." if stem is None
                              else f"Unknown stem {stem!r}; choose one of {list(STEMS)}.")
    if cifar_stem_padding not in (1, 2):
        raise ConversionError(f"cifar_stem_padding must be 1 (torchvision style) or 2 (solo-learn), got "
                              f"{cifar_stem_padding}.")
    if cifar_stem_padding == 2 and stem != "cifar":
        raise ConversionError("cifar_stem_padding=2 applies to the CIFAR stem only (this is the ImageNet stem).")

    resnet = backbones.resnet(backbone, input_shape=(None, None, 3), stem=stem, zero_init_residual=False,
                              synchronized_bn=synchronized_bn, name=name or backbone)
    plan = _plan(resnet)
    _check(inspection, plan, backbone, stem)
    used = [key for _, entries in plan for key, _ in entries]
    assert len(used) == len(set(used)), "a torch key mapped to two Keras variables"
    for layer, entries in plan:
        values = [np.asarray(inspection.keys[key], np.float32) for key, _ in entries]
        if isinstance(layer, keras.layers.Conv2D):
            values = [values[0].transpose(2, 3, 1, 0)]  # OIHW -> HWIO
        layer.set_weights(values)
    encoder = resnet
    if stem == "cifar" and cifar_stem_padding == 2:
        # padding 2 = one pixel of zeros around the input, then our stem's own padding of 1
        images = keras.Input(shape=(None, None, 3), name="images")
        padded = keras.layers.ZeroPadding2D(1, name="stem_extra_pad")(images)
        encoder = keras.Model(images, resnet(padded), name=f"{resnet.name}_pad2")
    counters = sorted(k for k in inspection.keys if k.endswith(f".{_COUNTER}"))
    report = {
        "backbone": backbone, "stem": stem, "cifar_stem_padding": cifar_stem_padding if stem == "cifar" else None,
        "prefix": inspection.prefix, "keys_used": len(used), "counters_skipped": len(counters),
        "source_dtypes": sorted({str(inspection.keys[k].dtype) for k in used}),
        "left_out": inspection.left_out, "ignored": inspection.ignored,
    }
    return encoder, report
