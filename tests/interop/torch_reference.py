"""Independent references for the torchvision interop tests, in NumPy (no torch, no Keras, no bt_keras).

* `resnet_forward`: torchvision's ResNet forward pass in float64 (eval-mode BatchNorm), written from
  torchvision/models/resnet.py's definitions, NCHW. tests/interop/test_convert.py first checks it against torch's own
  outputs of the fixture, then uses it where the fixture has none (ResNet-18, the CIFAR stems).
* `random_state_dict`: a torchvision ResNet state dict with random weights and BN statistics, keys and shapes from
  torchvision's definitions (not from the mapping under test).
* `write_torch_file`: writes the `torch.save` zip layout (data.pkl of protocol-2 opcodes + raw storages), so tests can
  make full checkpoints and odd files. Hand-written opcodes, so that no torch module is needed to pickle.
"""

from __future__ import annotations

import collections
import struct
import zipfile

import numpy as np

BLOCKS = {"resnet18": (False, (2, 2, 2, 2)), "resnet34": (False, (3, 4, 6, 3)), "resnet50": (True, (3, 4, 6, 3))}
EPS = 1e-5  # torch.nn.BatchNorm2d's default


# ------------------------------------------------------------------------------------------------- forward pass


def conv2d(x, w, stride=1, padding=0):
    """torch.nn.functional.conv2d (no bias, no groups): x [N, C, H, W], w [O, C, kh, kw], zero padding."""
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    kh, kw = w.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    n, c, ho, wo = windows.shape[:4]
    columns = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)
    return (columns @ w.reshape(w.shape[0], -1).T).reshape(n, ho, wo, -1).transpose(0, 3, 1, 2)


def batch_norm(x, state, name):
    p = {k: state[f"{name}.{k}"].astype(np.float64)[None, :, None, None]
         for k in ("weight", "bias", "running_mean", "running_var")}
    return (x - p["running_mean"]) / np.sqrt(p["running_var"] + EPS) * p["weight"] + p["bias"]


def max_pool_3x3_s2_p1(x):
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(4, 5))


def relu(x):
    return np.maximum(x, 0.0)


def resnet_forward(state, x, depth="resnet50", stem="imagenet", cifar_padding=1):
    """(features [N, 512 or 2048], output of layer1 [N, C, H, W]) of a torchvision ResNet in eval mode, float64."""
    bottleneck, blocks = BLOCKS[depth]
    w = {k: v.astype(np.float64) for k, v in state.items() if k.endswith("weight") and v.ndim == 4}
    x = np.asarray(x, np.float64)
    if stem == "imagenet":
        x = max_pool_3x3_s2_p1(relu(batch_norm(conv2d(x, w["conv1.weight"], 2, 3), state, "bn1")))
    else:
        x = relu(batch_norm(conv2d(x, w["conv1.weight"], 1, cifar_padding), state, "bn1"))
    after_layer1 = None
    for stage, count in enumerate(blocks, start=1):
        for block in range(count):
            name = f"layer{stage}.{block}"
            stride = 2 if (block == 0 and stage > 1) else 1
            if f"{name}.downsample.0.weight" in w:
                shortcut = batch_norm(conv2d(x, w[f"{name}.downsample.0.weight"], stride), state,
                                      f"{name}.downsample.1")
            else:
                shortcut = x
            if bottleneck:  # v1.5: the stride sits on the 3x3 conv2
                y = relu(batch_norm(conv2d(x, w[f"{name}.conv1.weight"]), state, f"{name}.bn1"))
                y = relu(batch_norm(conv2d(y, w[f"{name}.conv2.weight"], stride, 1), state, f"{name}.bn2"))
                y = batch_norm(conv2d(y, w[f"{name}.conv3.weight"]), state, f"{name}.bn3")
            else:
                y = relu(batch_norm(conv2d(x, w[f"{name}.conv1.weight"], stride, 1), state, f"{name}.bn1"))
                y = batch_norm(conv2d(y, w[f"{name}.conv2.weight"], 1, 1), state, f"{name}.bn2")
            x = relu(y + shortcut)
        if stage == 1:
            after_layer1 = x
    return x.mean(axis=(2, 3)), after_layer1


# ----------------------------------------------------------------------------------------------- random weights


def random_state_dict(depth="resnet18", stem="cifar", seed=0, dtype=np.float32):
    """torchvision's `resnetNN().state_dict()` key set (fc removed) with random values, as NumPy arrays."""
    rng = np.random.default_rng(seed)
    bottleneck, blocks = BLOCKS[depth]
    expansion = 4 if bottleneck else 1
    state = collections.OrderedDict()

    def conv(name, out, inp, k):
        state[f"{name}.weight"] = (rng.normal(size=(out, inp, k, k)) * np.sqrt(2.0 / (inp * k * k))).astype(dtype)

    def bn(name, channels):
        state[f"{name}.weight"] = rng.uniform(0.5, 1.5, channels).astype(dtype)
        state[f"{name}.bias"] = rng.normal(0, 0.2, channels).astype(dtype)
        state[f"{name}.running_mean"] = rng.normal(0, 0.2, channels).astype(dtype)
        state[f"{name}.running_var"] = rng.uniform(0.5, 2.0, channels).astype(dtype)
        state[f"{name}.num_batches_tracked"] = np.array(100, np.int64)

    conv("conv1", 64, 3, 7 if stem == "imagenet" else 3)
    bn("bn1", 64)
    inplanes = 64
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for block in range(count):
            name, stride = f"layer{stage}.{block}", 2 if (block == 0 and stage > 1) else 1
            if bottleneck:
                conv(f"{name}.conv1", planes, inplanes, 1), bn(f"{name}.bn1", planes)
                conv(f"{name}.conv2", planes, planes, 3), bn(f"{name}.bn2", planes)
                conv(f"{name}.conv3", planes * 4, planes, 1), bn(f"{name}.bn3", planes * 4)
            else:
                conv(f"{name}.conv1", planes, inplanes, 3), bn(f"{name}.bn1", planes)
                conv(f"{name}.conv2", planes, planes, 3), bn(f"{name}.bn2", planes)
            if stride != 1 or inplanes != planes * expansion:
                conv(f"{name}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{name}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    return state


# ------------------------------------------------------------------------------------------- torch.save layout

STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
                 np.dtype(np.float64): "DoubleStorage", np.dtype(np.int64): "LongStorage"}


class BFloat16Bits:
    """A bfloat16 tensor for `write_torch_file`, given as its uint16 bit patterns (NumPy has no bfloat16)."""

    def __init__(self, bits):
        self.bits = np.asarray(bits, np.uint16)


class StateDict(collections.OrderedDict):
    """What `module.state_dict()` returns: an OrderedDict with a `_metadata` attribute (pickled with BUILD)."""


class _Writer:
    """Protocol-2 pickle opcodes for dicts / lists / tuples / str / int / float / bool / None / ndarrays."""

    def __init__(self):
        self.out, self.storages = bytearray(b"\x80\x02"), []

    def glob(self, module, name):
        self.out += b"c" + f"{module}\n{name}\n".encode()

    def dump(self, obj):
        out = self.out
        if obj is None:
            out += b"N"
        elif isinstance(obj, bool):
            out += b"\x88" if obj else b"\x89"
        elif isinstance(obj, int):
            out += b"J" + struct.pack("<i", obj)
        elif isinstance(obj, float):
            out += b"G" + struct.pack(">d", obj)
        elif isinstance(obj, str):
            data = obj.encode()
            out += b"X" + struct.pack("<I", len(data)) + data
        elif isinstance(obj, tuple):
            out += b"("
            for item in obj:
                self.dump(item)
            out += b"t"
        elif isinstance(obj, list):
            out += b"]("
            for item in obj:
                self.dump(item)
            out += b"e"
        elif isinstance(obj, collections.OrderedDict):
            # as pickle saves OrderedDict.__reduce__: cls() , then the items (SETITEMS), then the state (BUILD)
            self.glob("collections", "OrderedDict")
            out += b")R("
            for key, value in obj.items():
                self.dump(key)
                self.dump(value)
            out += b"u"
            if getattr(obj, "_metadata", None) is not None:
                self.dump({"_metadata": obj._metadata})
                out += b"b"
        elif isinstance(obj, dict):
            out += b"}("
            for key, value in obj.items():
                self.dump(key)
                self.dump(value)
            out += b"u"
        elif isinstance(obj, (np.ndarray, BFloat16Bits)):
            storage_name = "BFloat16Storage" if isinstance(obj, BFloat16Bits) else STORAGE_NAMES[obj.dtype]
            obj = obj.bits if isinstance(obj, BFloat16Bits) else obj
            key = str(len(self.storages))
            self.storages.append(np.ascontiguousarray(obj))
            self.glob("torch._utils", "_rebuild_tensor_v2")
            out += b"(("
            self.dump("storage")
            self.glob("torch", storage_name)
            self.dump(key), self.dump("cpu"), self.dump(int(obj.size))
            out += b"tQ"  # TUPLE, BINPERSID
            strides = tuple(int(np.prod(obj.shape[i + 1:])) for i in range(obj.ndim))
            self.dump(0), self.dump(tuple(int(n) for n in obj.shape)), self.dump(strides), self.dump(False)
            self.glob("collections", "OrderedDict")
            out += b")R"  # OrderedDict()
            out += b"tR"  # the rebuild call
        else:
            raise TypeError(type(obj))


def write_torch_file(path, obj, name="archive", pickle_bytes=None):
    """Writes `obj` (or the raw `pickle_bytes`) in torch.save's zip layout; returns the path."""
    writer = _Writer()
    if pickle_bytes is None:
        writer.dump(obj)
        writer.out += b"."
        pickle_bytes = bytes(writer.out)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{name}/data.pkl", pickle_bytes)
        archive.writestr(f"{name}/byteorder", "little")
        for key, array in enumerate(writer.storages):
            archive.writestr(f"{name}/data/{key}", array.astype(array.dtype.newbyteorder("<")).tobytes())
        archive.writestr(f"{name}/version", "3\n")
    return path
