"""PyTorch's `torch.save` files read into NumPy arrays, without torch and without running pickled code.

Since PyTorch 1.6, `torch.save` writes a zip archive (facts from torch/serialization.py, format version 3):

    NAME/data.pkl        the saved object, pickled (protocol 2); each tensor is a call of
                         torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, meta])
                         whose storage is a persistent id ('storage', torch.FloatStorage, KEY, 'cpu', NUMEL)
    NAME/data/KEY        that storage's raw bytes: NUMEL elements, in the byte order of NAME/byteorder
    NAME/byteorder, NAME/version, NAME/.format_version, ...

A pickle can name any importable callable and call it (`os.system`, `builtins.eval`), so reading one with the
standard unpickler runs whatever its author chose. `_RestrictedUnpickler` resolves only the few globals a tensor
state dict needs (`ALLOWED_GLOBALS`) to functions of this module, and refuses every other one by name before
anything is called. Storages become NumPy arrays and tensors strided views of them (copied), so the result is
made of dicts, lists, tuples, numbers, strings and `numpy.ndarray`s only.

    >>> state = load_state_dict("resnet50.pth")          # {"conv1.weight": ndarray [64, 3, 7, 7], ...}

Hostile or damaged files are refused before large allocations: sizes come from the zip directory and are checked
before anything is inflated (data.pkl <= MAX_PICKLE_BYTES, each storage = its declared element count, all storages
<= MAX_TOTAL_BYTES), a tensor may not read a storage element twice (stride 0, overlapping views), and zip, zlib and
memory errors become one-line TorchFileErrors naming the file.

Not read: the legacy pre-1.6 format (a bare pickle stream), TorchScript archives (`torch.jit.save`), and files
whose pickle needs other globals (e.g. a training checkpoint holding an argparse Namespace); each is refused with
an error saying how to re-save the file so that it can be read.
"""

from __future__ import annotations

import collections
import io
import lzma
import math
import os
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np

# torch's storage classes, as the pickle names them, and the NumPy dtype of their elements. bfloat16 has no NumPy
# dtype; it is widened to float32 exactly (a bfloat16 is the upper half of a float32).
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
TENSOR_REBUILDERS = ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter")
ALLOWED_GLOBALS = ("collections.OrderedDict", *TENSOR_REBUILDERS, *(f"torch.{name}" for name in STORAGE_DTYPES))

# Caps on inflated sizes, checked against the zip directory before reading: a state dict's pickle is a few hundred
# bytes per tensor (a ResNet-50's is about 30 KB), its storages a few hundred MB.
MAX_PICKLE_BYTES = 64 << 20
MAX_TOTAL_BYTES = 16 << 30

RESAVE_HINT = ("re-save just the tensors with PyTorch: torch.save(torch.load(OLD, map_location='cpu', "
               "weights_only=False)['state_dict'], NEW)  (or the model's .state_dict())")


class TorchFileError(ValueError):
    """A file that is not a readable `torch.save` archive of tensors (the message says why and what to do)."""


class ForbiddenGlobalError(TorchFileError, pickle.UnpicklingError):
    """The pickle names a global outside `ALLOWED_GLOBALS`; nothing it names was imported or called."""

    def __init__(self, path, qualified_name: str):
        self.qualified_name = qualified_name
        super().__init__(
            f"{path}: its pickle names the global {qualified_name}, which a tensor state dict never needs, so it is "
            f"refused (nothing was imported or run). Allowed: {', '.join(ALLOWED_GLOBALS)}. If the file is a "
            f"training checkpoint holding other objects, {RESAVE_HINT}.")


class _StorageType:
    """Stands for `torch.<Name>Storage` inside the pickle: the element type of a persistent-id storage."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class _Storage:
    """One storage's elements (a 1-D array) and where it came from, for error messages."""

    def __init__(self, values: np.ndarray, key: str):
        self.values, self.key = values, key


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """torch._utils._rebuild_tensor_v2's arguments -> a NumPy array (a bounds-checked strided copy)."""
    if not isinstance(storage, _Storage):
        raise TorchFileError(f"a tensor's storage is a {type(storage).__name__}, not a storage of this file")
    values = storage.values
    size, stride, offset = tuple(int(n) for n in size), tuple(int(s) for s in stride), int(storage_offset)
    if len(size) != len(stride) or offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise TorchFileError(f"a tensor on storage {storage.key} has an invalid layout: offset {offset}, size "
                             f"{size}, stride {stride}")
    if 0 in size:
        return np.zeros(size, values.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= values.size:
        raise TorchFileError(f"a tensor of size {size} (offset {offset}, stride {stride}) reads past the end of "
                             f"storage {storage.key}, which holds {values.size} elements: the file is corrupt")
    # Checked before anything is copied: a view that reads an element twice (stride 0, overlapping strides) could
    # make a 1-element storage into an array of any size. A state dict's tensors never overlap.
    span = 1  # with the dimensions ordered by stride, each must step past everything the smaller ones cover
    for s, n in sorted((s, n) for n, s in zip(size, stride) if n > 1):
        if s < span:
            raise TorchFileError(
                f"a tensor of size {size} (stride {stride}) on storage {storage.key} would read storage elements "
                f"more than once ({math.prod(size)} elements from a storage of {values.size}): an expanded (stride 0), "
                "overlapping or interleaved view, which a state dict never holds; in PyTorch, save contiguous "
                "tensors (model.state_dict(), or tensor.clone()) with torch.save")
        span = s * (n - 1) + span
    view = np.lib.stride_tricks.as_strided(values[offset:], shape=size,
                                           strides=[s * values.itemsize for s in stride], writeable=False)
    return np.array(view, copy=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    """torch._utils._rebuild_parameter (an nn.Parameter, e.g. in an optimizer's or model's pickled state)."""
    if not isinstance(data, np.ndarray):
        raise TorchFileError(f"a Parameter wraps a {type(data).__name__}, not a tensor")
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


_ALLOWED = {"collections.OrderedDict": _ordered_dict, "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
            "torch._utils._rebuild_parameter": _rebuild_parameter}
assert set(_ALLOWED) | {f"torch.{n}" for n in STORAGE_DTYPES} == set(ALLOWED_GLOBALS)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles `data.pkl`: globals only from ALLOWED_GLOBALS (as this module's stand-ins), storages from the zip.

    Every way a pickle can reach a callable (GLOBAL, STACK_GLOBAL, INST, OBJ, the copyreg extension codes) goes
    through `find_class`, so refusing there refuses before anything foreign is imported or called.
    """

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path, byteorder: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.path, self.byteorder = archive, prefix, path, byteorder
        self.storages: dict[str, _Storage] = {}
        self.total_bytes = 0

    def find_class(self, module, name):
        qualified = f"{module}.{name}"
        if qualified in _ALLOWED:
            return _ALLOWED[qualified]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise ForbiddenGlobalError(self.path, qualified)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise TorchFileError(f"{self.path}: unexpected persistent id {pid!r} (want ('storage', <torch storage "
                                 "type>, key, location, numel))")
        _, storage_type, key, _location, numel = pid
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(self._read_storage(key, storage_type, int(numel)), key)
        return self.storages[key]

    def _read_storage(self, key: str, storage_type: _StorageType, numel: int) -> np.ndarray:
        member = f"{self.prefix}/data/{key}"
        if numel < 0:
            raise TorchFileError(f"{self.path}: the pickle gives storage {key} a negative element count ({numel}): "
                                 "the file is corrupt")
        try:
            info = self.archive.getinfo(member)
        except KeyError:
            raise TorchFileError(f"{self.path}: the pickle refers to storage {key}, but there is no {member} in "
                                 "the archive: the file is truncated or corrupt") from None
        bfloat16 = storage_type.dtype == "bfloat16"
        dtype = np.dtype(np.uint16) if bfloat16 else storage_type.dtype
        # Sizes are checked against the zip directory before anything is inflated (a deflated member can expand
        # a thousandfold); the zip reader then stops at the declared size.
        if info.file_size != numel * dtype.itemsize:
            raise TorchFileError(f"{self.path}: storage {key} ({storage_type.name}) should hold {numel} elements = "
                                 f"{numel * dtype.itemsize} bytes, but {member} has {info.file_size} bytes: the "
                                 "file is corrupt")
        self.total_bytes += info.file_size
        if self.total_bytes > MAX_TOTAL_BYTES:
            raise TorchFileError(f"{self.path}: its storages add up to more than {MAX_TOTAL_BYTES >> 30} GiB "
                                 f"(bt_keras.interop.torch_file.MAX_TOTAL_BYTES), far more than a ResNet's weights: "
                                 "save only the model's state_dict() with torch.save")
        values = _read_member(self.archive, info).view(dtype.newbyteorder("<" if self.byteorder == "little" else ">"))
        if not values.dtype.isnative:
            values = values.astype(dtype.newbyteorder("="))
        return _bfloat16_to_float32(values) if bfloat16 else values


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """A member's bytes as a uint8 array, inflated in chunks into one buffer of its declared size: peak memory is
    that size (ZipFile.read grows a bytes object, up to twice it). The CRC is checked at the end, as ZipFile.read."""
    out = np.empty(info.file_size, np.uint8)
    with archive.open(info) as member:
        done = 0
        while done < info.file_size:
            chunk = member.read(min(16 << 20, info.file_size - done))
            if not chunk:
                raise EOFError(f"{info.filename} ends after {done} of its {info.file_size} bytes")
            out[done:done + len(chunk)] = np.frombuffer(chunk, np.uint8)
            done += len(chunk)
        if member.read(1):  # also where zipfile checks the CRC-32
            raise zipfile.BadZipFile(f"{info.filename} holds more than its declared {info.file_size} bytes")
    return out


def _archive_prefix(archive: zipfile.ZipFile, path) -> str:
    """The archive's top folder (torch names it after the file); exactly one `TOP/data.pkl` must exist."""
    names = archive.namelist()
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) == 1:
        return pickles[0][: -len("/data.pkl")]
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise TorchFileError(f"{path} is a TorchScript archive (torch.jit.save), not a state dict: in PyTorch, save "
                             "the weights with torch.save(model.state_dict(), PATH) and convert that file.")
    raise TorchFileError(f"{path} is a zip archive but not a torch.save file: it holds {len(pickles)} "
                         f"TOP/data.pkl entries (want exactly 1); first entries: {names[:5]}")


def read_torch_file(path: str | os.PathLike):
    """The object `torch.save` wrote to `path`, with every tensor as a `numpy.ndarray` (dtype as saved).

    Raises FileNotFoundError, ForbiddenGlobalError (a pickled global outside ALLOWED_GLOBALS, refused before it
    is called), or TorchFileError (legacy format, TorchScript, corrupt archive), each naming the problem and fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No PyTorch file at {path}.")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"PK":
            raise TorchFileError(f"{path} starts like a zip archive but is not a readable one: the download or copy "
                                 "is probably truncated; fetch the file again.")
        if head[:1] == b"\x80":
            raise TorchFileError(
                f"{path} is in PyTorch's legacy (pre-1.6) serialisation format, which is not read here. Re-save it "
                "in the zip format with PyTorch >= 1.6: torch.save(torch.load(OLD, map_location='cpu'), NEW).")
        raise TorchFileError(f"{path} is not a torch.save file (a zip archive holding data.pkl); got bytes "
                             f"{head!r} at its start.")
    try:
        return _read_archive(path)
    except TorchFileError as error:  # errors raised while rebuilding a tensor do not know the file: name it
        if str(error).startswith(str(path)):
            raise
        raise TorchFileError(f"{path}: {error}") from None
    except MemoryError:
        raise TorchFileError(f"{path}: not enough memory to read it (its tensors are larger than this machine's "
                             "free memory); convert it on a machine with more memory") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, lzma.LZMAError, RuntimeError, EOFError,
            OSError) as error:  # bad CRC or directory, a broken stream, encryption, an unknown compression method
        raise TorchFileError(
            f"{path}: the zip archive is damaged or uses a feature torch.save never writes ({type(error).__name__}: "
            f"{error}); fetch or copy the file again, or re-save it in PyTorch with "
            "torch.save(torch.load(OLD, map_location='cpu'), NEW)") from None


def _read_archive(path: Path):
    """`read_torch_file` once `path` is known to be a zip archive (zip and memory errors pass through)."""
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive, path)
        names = set(archive.namelist())
        byteorder = "little"
        if f"{prefix}/byteorder" in names:
            if archive.getinfo(f"{prefix}/byteorder").file_size > 64:
                raise TorchFileError(f"{path}: {prefix}/byteorder is too long to be a byte order (want 'little' "
                                     "or 'big'): the file is corrupt")
            byteorder = archive.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise TorchFileError(f"{path}: unknown byte order {byteorder!r} in {prefix}/byteorder")
        pickle_size = archive.getinfo(f"{prefix}/data.pkl").file_size
        if pickle_size > MAX_PICKLE_BYTES:
            raise TorchFileError(f"{path}: its {prefix}/data.pkl would inflate to {pickle_size} bytes, more than the "
                                 f"{MAX_PICKLE_BYTES >> 20} MiB any state dict's pickle needs: the file is corrupt or "
                                 "not a state dict; save only the model's state_dict() with torch.save")
        unpickler = _RestrictedUnpickler(archive.read(f"{prefix}/data.pkl"), archive, prefix, path, byteorder)
        try:
            return unpickler.load()
        except TorchFileError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError,
                RecursionError) as error:
            raise TorchFileError(f"{path}: its data.pkl could not be read as a tensor state dict: "
                                 f"{type(error).__name__}: {error}") from None


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "backbone")


def find_state_dict(obj, path="the file") -> dict[str, np.ndarray]:
    """The tensor dict inside what `read_torch_file` returned: the object itself when it is a {name: tensor} dict,
    else the value of its first key among STATE_DICT_KEYS that is one (full training checkpoints: Lightning's
    `state_dict`, the official Barlow Twins `checkpoint.pth`'s `model`)."""
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if _is_tensor_dict(obj.get(key)):
                return dict(obj[key])
        raise TorchFileError(f"{path} holds a dict with keys {sorted(map(str, obj))[:12]} but no state dict (a "
                             f"{{name: tensor}} dict) at the top or under {list(STATE_DICT_KEYS)}; {RESAVE_HINT}.")
    raise TorchFileError(f"{path} holds a {type(obj).__name__}, not a state dict; in PyTorch, save "
                         "model.state_dict() with torch.save.")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """`{name: numpy array}` of the state dict in a `torch.save` file (see `read_torch_file`, `find_state_dict`)."""
    return find_state_dict(read_torch_file(path), path)
