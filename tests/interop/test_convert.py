"""torchvision ResNet checkpoints into Keras (bt_keras.interop.torchvision_resnet, .convert): the fixture's files read
exactly, the weight mapping, what is refused before converting, the convert CLI end to end. The reader on its own,
and the files it refuses: test_torch_file.py.

The judge is ../shared/fixtures/torchvision_resnet50 (see its MANIFEST.json): a real torch.save file of a torchvision
ResNet-50 with randomised BatchNorm parameters and statistics (float16), and torch's own float64 eval-mode outputs.
Where it has no outputs (ResNet-18, the CIFAR stems) the reference is tests/interop/torch_reference.py's NumPy forward
pass, itself checked against the fixture first. No torch anywhere.
"""

import json
import zipfile

import keras
import numpy as np
import pytest

from bt_keras import paths
from bt_keras.assembly import artifacts
from bt_keras.interop import torch_file
from bt_keras.interop.convert import convert_torchvision_checkpoint
from bt_keras.interop.torchvision_resnet import build_encoder, ConversionError
from tests.helpers import TORCHVISION_FIXTURE, numpy_knn, numpy_knn_topk, run_script
from tests.in_process import evaluate_in_process
from tests.interop import torch_reference as ref

needs_fixture = pytest.mark.skipif(not (TORCHVISION_FIXTURE / "MANIFEST.json").is_file(),
                                   reason=f"no fixture at {TORCHVISION_FIXTURE}")
RTOL = 1e-5  # max abs difference / max abs value; measured up to 2e-6 (README), float32 round-off


def relative_error(actual, expected) -> float:
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def fixture_state():
    return torch_file.load_state_dict(TORCHVISION_FIXTURE / "resnet50_random.pth")


@pytest.fixture(scope="module")
def fixture_encoder(fixture_state):
    encoder, report = build_encoder(fixture_state)
    return encoder, report


def nhwc(x):
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1), np.float32)


# --------------------------------------------------------------------------------------------- the torch file


@pytest.mark.slow
@needs_fixture
def test_float32_file_reads_its_exact_bytes_and_matches_the_converted_stem(fixture_state, fixture_encoder):
    small = torch_file.read_torch_file(TORCHVISION_FIXTURE / "small_float32.pth")
    assert sorted(small) == ["bn1.num_batches_tracked", "bn1.running_var", "conv1.weight"]
    assert small["conv1.weight"].dtype == np.float32 and small["conv1.weight"].shape == (64, 3, 7, 7)
    assert small["bn1.running_var"].dtype == np.float32 and small["bn1.num_batches_tracked"].dtype == np.int64
    with zipfile.ZipFile(TORCHVISION_FIXTURE / "small_float32.pth") as archive:  # independently: the storage's raw bytes
        raw = np.frombuffer(archive.read("small_float32/data/0"), "<f4")
    np.testing.assert_array_equal(small["conv1.weight"].ravel(), raw)  # exact, and C-ordered as torch's strides say
    # The float16 file holds the same tensors rounded to float16; the converted encoder holds those exactly.
    encoder, _ = fixture_encoder
    for key in ("conv1.weight", "bn1.running_var", "bn1.num_batches_tracked"):
        np.testing.assert_array_equal(small[key].astype(fixture_state[key].dtype), fixture_state[key])
    np.testing.assert_array_equal(encoder.get_layer("stem_conv").kernel.numpy(),
                                  small["conv1.weight"].astype(np.float16).astype(np.float32).transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(encoder.get_layer("stem_bn").moving_variance.numpy(),
                                  small["bn1.running_var"].astype(np.float16).astype(np.float32))
    # float32 tensors convert exactly too: the fixture with its stem replaced by the float32 ones
    mixed = {**fixture_state, "conv1.weight": small["conv1.weight"], "bn1.running_var": small["bn1.running_var"]}
    converted, report = build_encoder(mixed)
    assert report["source_dtypes"] == ["float16", "float32"]
    np.testing.assert_array_equal(converted.get_layer("stem_conv").kernel.numpy(),
                                  small["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(converted.get_layer("stem_bn").moving_variance.numpy(), small["bn1.running_var"])


# ------------------------------------------------------------------------------------------------ the mapping


@needs_fixture
def test_the_reference_forward_pass_agrees_with_torch(fixture_state):
    features, layer1 = ref.resnet_forward(fixture_state, np.load(TORCHVISION_FIXTURE / "inputs.npy"))
    assert relative_error(features, np.load(TORCHVISION_FIXTURE / "features.npy")) < 1e-6
    assert relative_error(layer1, np.load(TORCHVISION_FIXTURE / "layer1.npy")) < 1e-6


@needs_fixture
def test_converted_resnet50_equals_torch_on_the_fixture(fixture_encoder):
    encoder, report = fixture_encoder
    assert report["backbone"] == "resnet50" and report["stem"] == "imagenet"
    assert report["keys_used"] == 265 and report["counters_skipped"] == 53  # 318 keys, each used or a BN counter
    inputs = nhwc(np.load(TORCHVISION_FIXTURE / "inputs.npy"))
    features = encoder.predict(inputs, verbose=0)
    expected = np.load(TORCHVISION_FIXTURE / "features.npy")
    assert features.shape == expected.shape == (4, 2048)
    assert relative_error(features, expected) < RTOL
    layer1 = keras.Model(encoder.input, encoder.get_layer("stage1_block3_out").output).predict(inputs, verbose=0)
    assert relative_error(layer1.transpose(0, 3, 1, 2), np.load(TORCHVISION_FIXTURE / "layer1.npy")) < RTOL


@pytest.mark.parametrize("depth,stem,padding,prefix", [
    ("resnet18", "cifar", 1, ""), ("resnet18", "cifar", 2, "module.backbone."),
    ("resnet34", "imagenet", 1, "module."), ("resnet18", "imagenet", 1, "backbone."),
])
def test_other_depths_stems_and_prefixes_match_the_reference(depth, stem, padding, prefix):
    """Each case its own path: the CIFAR stem (torchvision-style padding 1, no prefix); solo-learn's padding 2 under a
    DDP prefix with a projector beside it; ResNet-34's block counts; the ImageNet stem at depth 18."""
    state = ref.random_state_dict(depth, stem, seed=3)
    images = np.random.default_rng(4).normal(size=(2, 3, 20, 20))
    expected, _ = ref.resnet_forward(state, images, depth, stem, cifar_padding=padding)
    prefixed = {prefix + k: v for k, v in state.items()}
    beside = {"module.backbone.": "module.projector.0.weight", "backbone.": "projector.0.weight"}.get(prefix)
    if beside:  # a full checkpoint's other modules sit beside the backbone and are left out
        prefixed[beside] = np.zeros((8, 512), np.float32)
    encoder, report = build_encoder(prefixed, cifar_stem_padding=padding)  # depth and stem read from the file
    assert (report["backbone"], report["stem"], report["prefix"]) == (depth, stem, prefix)
    assert report["left_out"] == ([beside] if beside else [])
    assert relative_error(encoder.predict(nhwc(images), verbose=0), expected) < RTOL
    if padding == 2:  # solo-learn's CIFAR stem: its padding is not in the state dict, and it changes the features
        padding_1, _ = ref.resnet_forward(state, images, depth, stem, cifar_padding=1)
        assert relative_error(padding_1, expected) > 1e-2  # so the flag matters, and the check above sees it


@needs_fixture
def test_a_resnet50_file_given_as_resnet18_names_keys_shapes_and_the_fix(fixture_state):
    with pytest.raises(ConversionError) as error:
        build_encoder(fixture_state, "resnet18")
    message = str(error.value)
    assert "\n" not in message
    assert "198 unexpected keys (layer1.0.bn3.bias" in message and "layer1.0.conv3.weight" in message
    assert "layer1.0.conv1.weight is 64x64x1x1 (resnet18: 64x64x3x3)" in message
    assert "--backbone=resnet50" in message


def test_missing_wrong_shape_and_extra_keys_are_listed_together():
    state = ref.random_state_dict("resnet18", "imagenet")
    del state["layer3.1.bn2.running_var"]
    state["layer4.0.conv2.weight"] = np.zeros((512, 512, 3, 1), np.float32)
    state["fc.weight"], state["fc.bias"] = np.zeros((10, 512), np.float32), np.zeros(10, np.float32)
    with pytest.raises(ConversionError) as error:
        build_encoder(state)
    message = str(error.value)
    assert "2 unexpected keys (fc.bias, fc.weight)" in message
    assert "1 missing keys (layer3.1.bn2.running_var)" in message
    assert "1 shape mismatches (layer4.0.conv2.weight is 512x512x3x1 (resnet18: 512x512x3x3))" in message
    assert "--ignore_keys=fc" in message
    state["layer3.1.bn2.running_var"] = np.ones(256, np.float32)
    state["layer4.0.conv2.weight"] = np.zeros((512, 512, 3, 3), np.float32)
    _, report = build_encoder(state, ignore=("fc",))
    assert report["ignored"] == ["fc.bias", "fc.weight"]
    state["layer2.0.bn1.running_var"] = np.full(128, np.nan, np.float32)
    with pytest.raises(ConversionError, match="layer2.0.bn1.running_var holds NaN"):
        build_encoder(state, ignore=("fc",))


def test_no_resnet_an_unsupported_depth_and_a_wrong_stem():
    with pytest.raises(ConversionError, match="No torchvision ResNet"):
        build_encoder({"encoder.conv1.weight": np.zeros((64, 3, 3, 3), np.float32)})
    deep = ref.random_state_dict("resnet50", "imagenet")
    deep.update({f"layer3.{i}.conv1.weight": deep["layer3.1.conv1.weight"] for i in range(6, 23)})
    with pytest.raises(ConversionError, match=r"blocks \(3, 4, 23, 3\).*supported are"):
        build_encoder(deep)
    with pytest.raises(ConversionError, match=r"conv1.weight is 64x3x3x3 \(resnet18: 64x3x7x7\)"):
        build_encoder(ref.random_state_dict("resnet18", "cifar"), stem="imagenet")


# ------------------------------------------------------------------------------------------ refused before converting


@pytest.mark.hostile
def test_negative_running_var_is_refused_by_name():
    state = ref.random_state_dict("resnet18", "cifar", seed=1)
    state["layer2.0.bn1.running_var"][3] = -0.5
    with pytest.raises(ConversionError, match=r"layer2\.0\.bn1\.running_var holds negative values"):
        build_encoder(state)


@pytest.mark.hostile
def test_image_size_0_is_refused_and_output_must_be_a_folder(tmp_path):
    state = ref.random_state_dict("resnet18", "cifar", seed=2)
    path = ref.write_torch_file(tmp_path / "r18.pth", state)
    with pytest.raises(ValueError, match=r"image_size=0"):
        convert_torchvision_checkpoint(path, tmp_path / "out", image_size=0)
    with pytest.raises(ValueError, match=r"image_size=-3"):
        convert_torchvision_checkpoint(path, tmp_path / "out", image_size=-3)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(FileExistsError, match=r"afile is a file: --output must be a folder"):
        convert_torchvision_checkpoint(path, afile)
    assert afile.read_text() == "x"


# ---------------------------------------------------------------------------------------------- end to end


@needs_fixture
@pytest.mark.slow
def test_convert_then_evaluate_and_export_in_fresh_processes(tmp_path):
    out = tmp_path / "barlowtwins_r50"
    # The installed scripts, bt-keras-convert and bt-keras-export, where other tests use `python -m`.
    done = run_script("bt-keras-convert", f"--torch_checkpoint={TORCHVISION_FIXTURE / 'resnet50_random.pth'}",
                      f"--output={out}", "--image_size=64")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resnet50, imagenet stem, 2048-d features" in done.stdout
    metadata = json.loads((out / paths.ENCODER_METADATA).read_text())
    assert metadata["image_size"] == 64 and metadata["mean"] == [0.485, 0.456, 0.406]
    assert metadata["std"] == [0.229, 0.224, 0.225] and metadata["feature_dim"] == 2048
    assert metadata["converted_from"]["sha256"] == json.loads((TORCHVISION_FIXTURE / "MANIFEST.json").read_text())[
        "files"]["resnet50_random.pth"]
    # the saved encoder still equals torch's outputs (any input size: the fixture's are 64 px)
    encoder, _ = artifacts.load_encoder(out)
    inputs = nhwc(np.load(TORCHVISION_FIXTURE / "inputs.npy"))
    features = encoder.predict(inputs, verbose=0)
    assert relative_error(features, np.load(TORCHVISION_FIXTURE / "features.npy")) < RTOL

    with pytest.raises(FileExistsError, match="exists already; pass --overwrite"):
        convert_torchvision_checkpoint(TORCHVISION_FIXTURE / "resnet50_random.pth", out)

    # The kNN command on the folder the convert process wrote, run in this process (its flags parsed by absl into
    # flag values of its own): the export below is the fresh process that reads the folder again.
    from bt_keras.cli import evaluate_knn

    evaluate_in_process(evaluate_knn, f"--encoder={out}", "--dataset=digits", "--limit_train=100", "--limit_test=50",
                        "--k=10", "--batch_size=50", "--verbose=0", f"--output={tmp_path / 'knn.json'}")
    record = json.loads((tmp_path / "knn.json").read_text())
    assert record["preprocessing"]["image_size"] == 64 and record["encoder"]["backbone"] == "resnet50"
    # The command's accuracies, recounted: the converted encoder's features of the same digits (protocol.setup,
    # same flags) through tests.helpers' NumPy kNN. Exact, as kNN ranks far-apart votes.
    from bt_keras.evaluation import protocol

    s = protocol.setup(out, dataset="digits", limit_train=100, limit_test=50, batch_size=50, verbose=0)
    (train_x, train_y), (test_x, test_y) = s.train_features(), s.test_features()
    votes = numpy_knn(train_x.astype(np.float64), train_y, test_x.astype(np.float64), k=10,
                      temperature=record["settings"]["temperature"], num_classes=10)
    assert (record["top1"], record["top5"]) == numpy_knn_topk(votes, test_y), (record, numpy_knn_topk(votes, test_y))
    assert record["top1"] < record["top5"]  # a swapped k would show

    export = run_script("bt-keras-export", f"--checkpoint={out}", f"--export_dir={tmp_path / 'models'}",
                        "--batch_warmup_sizes=1")
    assert export.returncode == 0, export.stderr[-3000:]
    import tensorflow as tf

    served = tf.saved_model.load(str(tmp_path / "models" / "1")).signatures["embed_normalized"]
    embedding = served(normalized=tf.constant(inputs))["embedding"].numpy()
    assert relative_error(embedding, features) < 1e-5


@pytest.mark.slow
def test_an_official_style_full_checkpoint_converts_from_its_file(tmp_path):
    """{'epoch', 'model': DDP state_dict (module.backbone.* + module.projector.*), 'optimizer'} as the official
    checkpoint.pth, here with a CIFAR-stem ResNet-18: found, prefix stripped, projector left out, CIFAR defaults."""
    state = ref.random_state_dict("resnet18", "cifar", seed=7)
    model = ref.StateDict({f"module.backbone.{k}": v for k, v in state.items()})
    model["module.projector.0.weight"] = np.zeros((16, 512), np.float32)
    model._metadata = ref.StateDict({"": {"version": 1}})
    optimizer = {"state": {0: {"mu": np.zeros(3, np.float32)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    path = ref.write_torch_file(tmp_path / "checkpoint.pth", {"epoch": 3, "model": model, "optimizer": optimizer})
    encoder_path, metadata = convert_torchvision_checkpoint(path, tmp_path / "out")
    assert metadata["backbone"] == "resnet18" and metadata["stem"] == "cifar" and metadata["image_size"] == 32
    assert metadata["mean"] == [0.4914, 0.4822, 0.4465] and metadata["feature_dim"] == 512
    assert metadata["converted_from"]["prefix"] == "module.backbone." and metadata["converted_from"]["left_out"] == 1
    encoder, saved = artifacts.load_encoder(tmp_path / "out")
    assert saved == metadata and encoder_path == tmp_path / "out" / paths.ENCODER_FILE
    images = np.random.default_rng(8).normal(size=(2, 3, 12, 12))
    expected, _ = ref.resnet_forward(state, images, "resnet18", "cifar")
    assert relative_error(encoder.predict(nhwc(images), verbose=0), expected) < RTOL


@pytest.mark.hostile
@needs_fixture
def test_cli_errors_are_one_line_with_exit_status_2(tmp_path, convert_main):
    """The command's main in this process (conftest.py's convert_main; the command in a fresh process, exit status
    and console line included, is test_torch_file.py's pickled os.system case)."""
    status, last = convert_main(TORCHVISION_FIXTURE / "resnet50_random.pth", tmp_path / "out", backbone="resnet18")
    assert status == 2
    assert last.startswith("ERROR: The state dict does not fit torchvision's resnet18")
    assert "--backbone=resnet50" in last
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="No PyTorch file at"):
        convert_torchvision_checkpoint(tmp_path / "nope.pth", tmp_path / "out")

