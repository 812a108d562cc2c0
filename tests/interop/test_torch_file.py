"""The torch.save reader (bt_keras.interop.torch_file): a full checkpoint and strided views read back exactly; pickled
code, foreign files and hostile or damaged archives are each refused with one error naming the file, before anything
is run or any large allocation, and `python -m bt_keras.convert` exits 2 instead of printing a traceback.

The files are written by hand (zipfile + raw pickle opcodes, or tests/interop/torch_reference.py's writer), no torch: a
tensor is the pickle call torch._utils._rebuild_tensor_v2(storage persistent id, offset, size, stride, False,
OrderedDict()).
"""

import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from bt_keras.interop import torch_file
from bt_keras.interop.torch_file import ForbiddenGlobalError, TorchFileError
from tests.helpers import run_module
from tests.interop import torch_reference as ref


def _str(text):
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(n):
    return b"J" + struct.pack("<i", n)


def _global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def tensor_pickle(numel, offset, size, stride, key="0"):
    """A protocol-2 pickle of {'w': tensor} whose layout (numel, offset, size, stride) is given as is."""
    storage = (b"(" + _str("storage") + _global("torch", "FloatStorage") + _str(key) + _str("cpu") + _int(numel)
               + b"tQ")
    call = (_global("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + _int(offset)
            + b"(" + b"".join(map(_int, size)) + b"t(" + b"".join(map(_int, stride)) + b"t\x89"
            + _global("collections", "OrderedDict") + b")RtR")
    return b"\x80\x02}(" + _str("w") + call + b"u."


def write_archive(path, pickle_bytes, storages, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)
    return path


@pytest.fixture
def opened(monkeypatch):
    """The names of every zip member opened for reading (inflated), recorded while the test runs."""
    names, original = [], zipfile.ZipFile.open

    def recording_open(self, name, mode="r", *args, **kwargs):
        if mode == "r":
            names.append(name.filename if isinstance(name, zipfile.ZipInfo) else name)
        return original(self, name, mode, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", recording_open)
    return names


# ----------------------------------------------------------------------------------------------- what it reads


def test_writer_round_trip_with_nested_checkpoint_and_strided_views(tmp_path):
    """A full checkpoint (ints, floats, lists, nested dicts, a state_dict() OrderedDict with its `_metadata`, as the
    official checkpoint.pth) reads back; the state dict is found under `model`."""
    weights = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    model = ref.StateDict({"a.weight": weights, "a.half": weights[0].astype(np.float16),
                           "a.count": np.array(5, np.int64),
                           "a.bf16": ref.BFloat16Bits([0x3F80, 0xC020, 0x0000, 0x4049])})
    model._metadata = ref.StateDict({"": {"version": 1}, "a": {"version": 2}})
    checkpoint = {"epoch": 7, "lr": 0.25, "flags": [True, None, "x"], "model": model}
    path = ref.write_torch_file(tmp_path / "ckpt.pth", checkpoint)
    loaded = torch_file.read_torch_file(path)
    assert (loaded["epoch"], loaded["lr"], loaded["flags"]) == (7, 0.25, [True, None, "x"])
    assert loaded["model"]._metadata == {"": {"version": 1}, "a": {"version": 2}}
    state = torch_file.find_state_dict(loaded)
    np.testing.assert_array_equal(state["a.weight"], weights)
    assert state["a.half"].dtype == np.float16 and int(state["a.count"]) == 5
    # bfloat16 is the top half of a float32: 0x3F80 = 1.0, 0xC020 = -2.5, 0x4049 = 3.140625
    assert state["a.bf16"].dtype == np.float32 and state["a.bf16"].tolist() == [1.0, -2.5, 0.0, 3.140625]
    # a transposed view of a storage (stride (1, 4)), as torch saves non-contiguous tensors
    storage = torch_file._Storage(np.arange(12, dtype=np.float32), "0")
    view = torch_file._rebuild_tensor_v2(storage, 1, (4, 2), (1, 4))
    np.testing.assert_array_equal(view, np.arange(12, dtype=np.float32)[1:].__getitem__(
        np.arange(4)[:, None] + 4 * np.arange(2)[None, :]))
    with pytest.raises(TorchFileError, match="reads past the end"):
        torch_file._rebuild_tensor_v2(storage, 5, (4, 2), (1, 4))


# ------------------------------------------------------------------------------- pickled code and foreign files


def forbidden_zip(path, pickle_bytes):
    return ref.write_torch_file(path, None, pickle_bytes=pickle_bytes)


@pytest.mark.slow
@pytest.mark.hostile
def test_a_pickled_os_system_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    command = f"touch {marker}"
    # PROTO 2, GLOBAL os.system, the command as a 1-tuple, REDUCE, STOP: what a malicious .pth holds
    payload = (b"\x80\x02cos\nsystem\nX" + len(command).to_bytes(4, "little") + command.encode() + b"\x85R.")
    path = forbidden_zip(tmp_path / "evil.pth", payload)
    refused = r"names the global os\.system.*nothing was imported or run"
    with pytest.raises(ForbiddenGlobalError, match=refused) as error:
        torch_file.read_torch_file(path)
    assert not marker.exists()
    # The command in a fresh process: exit status 2, and its last line is the reader's error on one line.
    done = run_module("bt_keras.convert", f"--torch_checkpoint={path}", f"--output={tmp_path / 'out'}")
    assert done.returncode == 2 and not marker.exists() and not (tmp_path / "out").exists()
    assert done.stderr.strip().splitlines()[-1] == "ERROR: " + " ".join(str(error.value).split())
    assert "Traceback" not in done.stderr
    # The payload is live: Python's own unpickler (in a throwaway process) runs it. So the refusal above is real.
    subprocess.run([sys.executable, "-c", "import pickle,sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=payload, check=True, timeout=60)
    assert marker.exists()


class _Evil:
    def __reduce__(self):
        return (eval, ("1+1",))


@pytest.mark.hostile
def test_other_globals_and_protocols_are_refused_by_name(tmp_path):
    # protocol 4 reaches globals through STACK_GLOBAL; builtins.eval
    path = forbidden_zip(tmp_path / "p4.pth", pickle.dumps({"w": _Evil()}, protocol=4))
    with pytest.raises(ForbiddenGlobalError, match=r"builtins\.eval"):
        torch_file.read_torch_file(path)
    # a global that looks like torch's but is not on the list
    path = forbidden_zip(tmp_path / "t.pth", b"\x80\x02ctorch\nload\n)R.")
    with pytest.raises(ForbiddenGlobalError, match=r"torch\.load"):
        torch_file.read_torch_file(path)


@pytest.mark.hostile
def test_legacy_torchscript_and_foreign_files_get_a_clear_error(tmp_path):
    legacy = tmp_path / "legacy.pth"  # torch < 1.6 wrote a bare pickle stream starting with a magic number
    legacy.write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.")
    with pytest.raises(TorchFileError, match=r"legacy \(pre-1\.6\).*torch\.save\(torch\.load\(OLD"):
        torch_file.read_torch_file(legacy)
    script = tmp_path / "script.pt"
    with zipfile.ZipFile(script, "w") as archive:
        archive.writestr("m/constants.pkl", b"")
        archive.writestr("m/code/__torch__.py", "")
    with pytest.raises(TorchFileError, match="TorchScript"):
        torch_file.read_torch_file(script)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(TorchFileError, match="not a torch.save file"):
        torch_file.read_torch_file(text)
    with pytest.raises(FileNotFoundError, match="No PyTorch file"):
        torch_file.read_torch_file(tmp_path / "absent.pth")


# ------------------------------------------------------------------------------------ views larger than storage


@pytest.mark.hostile
def test_a_stride_0_view_of_one_element_is_refused_before_it_is_materialised(tmp_path):
    # 513 bytes of file; read as is, 2000 x 2000 float32 copies of one element (the red team's was 20000 x 20000)
    path = write_archive(tmp_path / "expand.pth", tensor_pickle(1, 0, (2000, 2000), (0, 0)),
                         {"0": np.zeros(1, np.float32).tobytes()})
    with pytest.raises(TorchFileError, match=r"expand\.pth: .*\(2000, 2000\).*storage 0 would read storage "
                                             r"elements more than once \(4000000 elements from a storage of 1\)"):
        torch_file.read_torch_file(path)


@pytest.mark.hostile
def test_overlapping_views_are_refused_and_real_layouts_still_read(tmp_path):
    storage = torch_file._Storage(np.arange(12, dtype=np.float32), "3")
    for size, stride in [((2, 2), (1, 1)), ((3, 4), (1, 1)), ((2, 3), (3, 0)), ((6,), (0,))]:
        with pytest.raises(TorchFileError, match="storage 3 would read storage elements more than once"):
            torch_file._rebuild_tensor_v2(storage, 0, size, stride)
    # contiguous, transposed, a size-1 dimension of any stride, a column slice: what torch saves
    values = np.arange(12, dtype=np.float32)
    np.testing.assert_array_equal(torch_file._rebuild_tensor_v2(storage, 0, (3, 4), (4, 1)), values.reshape(3, 4))
    np.testing.assert_array_equal(torch_file._rebuild_tensor_v2(storage, 0, (4, 3), (1, 4)), values.reshape(3, 4).T)
    np.testing.assert_array_equal(torch_file._rebuild_tensor_v2(storage, 2, (1, 5), (0, 1)), values[None, 2:7])
    np.testing.assert_array_equal(torch_file._rebuild_tensor_v2(storage, 1, (3, 2), (4, 1)),
                                  values.reshape(3, 4)[:, 1:3])


# ------------------------------------------------------------------------------------------------- zip bombs


@pytest.mark.hostile
def test_a_deflated_storage_larger_than_its_numel_is_refused_without_inflating_it(tmp_path, opened):
    path = write_archive(tmp_path / "bomb.pth", tensor_pickle(1, 0, (1,), (1,)), {"0": bytes(64 << 20)},
                         zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 200_000  # 64 MiB of zeros deflate to ~64 KB
    with pytest.raises(TorchFileError, match=r"bomb\.pth: storage 0 \(FloatStorage\) should hold 1 elements = 4 "
                                             r"bytes, but archive/data/0 has 67108864 bytes"):
        torch_file.read_torch_file(path)
    assert "archive/data/0" not in opened


@pytest.mark.hostile
def test_a_deflated_data_pkl_over_the_cap_is_refused_without_inflating_it(tmp_path, opened):
    path = tmp_path / "pkl_bomb.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02" + b"N0" * ((64 << 20) // 2 + 1) + b"N.")
    with pytest.raises(TorchFileError, match=r"pkl_bomb\.pth: its archive/data\.pkl would inflate to 67108870 "
                                             r"bytes, more than the 64 MiB"):
        torch_file.read_torch_file(path)
    assert "archive/data.pkl" not in opened


@pytest.mark.hostile
def test_storages_over_the_total_cap_are_refused_before_reading_the_one_over(tmp_path, monkeypatch, opened):
    path = ref.write_torch_file(tmp_path / "two.pth", {"a": np.zeros(4, np.float32), "b": np.ones(4, np.float32)})
    np.testing.assert_array_equal(torch_file.load_state_dict(path)["b"], np.ones(4))
    monkeypatch.setattr(torch_file, "MAX_TOTAL_BYTES", 20)  # 16 bytes each: the second goes over
    opened.clear()
    with pytest.raises(TorchFileError, match=r"two\.pth: its storages add up to more than"):
        torch_file.read_torch_file(path)
    assert "archive/data/0" in opened and "archive/data/1" not in opened


# ------------------------------------------------------------------------------------------ damaged archives


def _small(tmp_path):
    return ref.write_torch_file(tmp_path / "small.pth", {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})


def _patched(tmp_path, name, change):
    data = bytearray(_small(tmp_path).read_bytes())
    change(data)
    (tmp_path / name).write_bytes(bytes(data))
    return tmp_path / name


def _flip_storage_byte(data):  # a byte of data/0's contents (stored: it follows its local header's name)
    data[data.find(b"archive/data/0") + len(b"archive/data/0") + 2] ^= 0xFF


def _set_in_headers(offsets):
    def change(data):
        for signature, offset, value in offsets:
            at = data.find(signature)
            while at >= 0:
                data[at + offset] = value(data[at + offset])
                at = data.find(signature, at + 4)
    return change


def _bad_zlib(tmp_path):
    path = write_archive(tmp_path / "deflated.pth", tensor_pickle(1000, 0, (1000,), (1,)),
                         {"0": np.random.default_rng(0).random(1000).astype(np.float32).tobytes()},
                         zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    start = data.find(b"archive/data/0") + len(b"archive/data/0")
    for i in range(start + 10, start + 60):
        data[i] ^= 0x55
    (tmp_path / "badzlib.pth").write_bytes(bytes(data))
    return tmp_path / "badzlib.pth"


DAMAGED = {  # name -> (make the file, what zipfile / zlib raised before: quoted in the message)
    "badcrc": (lambda t: _patched(t, "badcrc.pth", _flip_storage_byte), "Bad CRC-32"),
    "bad_directory": (lambda t: _patched(t, "bad_directory.pth", lambda d: d.__setitem__(
        slice(d.find(b"PK\x01\x02"), d.find(b"PK\x01\x02") + 4), b"XXXX")), "central directory"),
    "badzlib": (_bad_zlib, "Error -3 while decompressing"),
    "encrypted": (lambda t: _patched(t, "encrypted.pth", _set_in_headers(
        [(b"PK\x03\x04", 6, lambda b: b | 1), (b"PK\x01\x02", 8, lambda b: b | 1)])), "password required"),
    "method99": (lambda t: _patched(t, "method99.pth", _set_in_headers(
        [(b"PK\x03\x04", 8, lambda b: 99), (b"PK\x01\x02", 10, lambda b: 99)])), "compression method"),
}


@pytest.mark.hostile
@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_a_damaged_archive_is_one_torch_file_error_naming_the_file_and_the_fix(tmp_path, name):
    make, cause = DAMAGED[name]
    path = make(tmp_path)
    with pytest.raises(TorchFileError) as caught:
        torch_file.read_torch_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: the zip archive is damaged") and cause in message
    assert "re-save it in PyTorch with torch.save(" in message and "\n" not in message


@pytest.mark.hostile
def test_running_out_of_memory_is_one_line(tmp_path, monkeypatch):
    def no_memory(self):
        raise MemoryError()

    monkeypatch.setattr(torch_file._RestrictedUnpickler, "load", no_memory)
    with pytest.raises(TorchFileError, match=r"small\.pth: not enough memory to read it"):
        torch_file.read_torch_file(_small(tmp_path))


@pytest.mark.hostile
def test_the_cli_reports_a_damaged_archive_and_an_expanded_view_in_one_line_with_status_2(tmp_path, convert_main):
    """The convert command's error handling (its main in this process: conftest.py's convert_main) on a damaged
    archive, and on a 513-byte file whose stride-0 view would be 100000 x 100000 float32 (40 GB) if it were
    materialised."""
    bad = _patched(tmp_path, "badcrc.pth", _flip_storage_byte)
    expand = write_archive(tmp_path / "expand.pth", tensor_pickle(1, 0, (100000, 100000), (0, 0)),
                           {"0": np.zeros(1, np.float32).tobytes()})
    for path, words in ((bad, "Bad CRC-32"), (expand, "more than once")):
        status, last = convert_main(path, tmp_path / "out")
        assert status == 2 and last.startswith(f"ERROR: {path}: ") and words in last, last
        assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- layout and count messages


@pytest.mark.hostile
def test_out_of_range_layouts_and_negative_counts_name_the_file(tmp_path):
    one = {"0": np.zeros(1, np.float32).tobytes()}
    offset = write_archive(tmp_path / "offset.pth", tensor_pickle(1, 5, (1,), (1,)), one)
    with pytest.raises(TorchFileError, match=rf"^{tmp_path}/offset\.pth: a tensor of size \(1,\) \(offset 5.*reads "
                                             "past the end of storage 0"):
        torch_file.read_torch_file(offset)
    negative = write_archive(tmp_path / "negative.pth", tensor_pickle(-1, 0, (1,), (1,)), one)
    with pytest.raises(TorchFileError, match=r"negative\.pth: the pickle gives storage 0 a negative element count "
                                             r"\(-1\): the file is corrupt"):
        torch_file.read_torch_file(negative)
