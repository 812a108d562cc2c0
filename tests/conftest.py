"""Test set-up: split the CPU into 4 logical devices, so multi-replica strategies can be tested on one machine; the
fixtures several folders share; and, where `BT_KERAS_REQUIRE_SHARED=1` (CI sets it), a session that stops at once with
one line when the offline data in ../shared is missing, instead of skipping the tests that need it.

The device split must run before TensorFlow initialises its devices, which is why it lives here, imported first by
pytest.
"""

import os
import shutil

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 4

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(_cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS)



# The files that take longest (CI's --durations), started first: the xdist workers take whole files in collection
# order, and the quickstart's three minutes, collected near the end, ran alone while the other worker sat idle.
LONGEST_FIRST = ("tests/test_quickstart.py", "tests/train/test_sharding.py", "tests/benchmarks/test_accelerator.py",
                 "tests/train/test_trainer.py", "tests/data/test_service.py", "tests/method/test_precision.py")


def pytest_collection_modifyitems(session, config, items):
    """Moves LONGEST_FIRST's files to the front, in that order (a stable sort: the rest keep pytest's order)."""
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def pytest_configure(config):
    """With BT_KERAS_REQUIRE_SHARED=1 a missing CIFAR-10 (TFDS format) or torch fixture is a red run (pytest's usage
    error, exit 4), not green skips."""
    if os.environ.get("BT_KERAS_REQUIRE_SHARED", "").strip() not in ("1", "true", "yes"):
        return
    from tests.helpers import SHARED, TFDS_DIR, TORCHVISION_FIXTURE

    missing = [str(path) for path in (TFDS_DIR / "cifar10", TORCHVISION_FIXTURE / "MANIFEST.json") if not path.exists()]
    if missing:
        raise pytest.UsageError(f"BT_KERAS_REQUIRE_SHARED=1 but the offline test data is missing: {', '.join(missing)} "
                                f"(put the shared folder at {SHARED}, or set BT_KERAS_SHARED_DIR to it)")


# ------------------------------------------------------------ one short training run, shared by the files that use it


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished two-epoch run of three steps (tests.helpers.trainer): checkpoints 0, 3 and 6, encoder.keras at step
    6. Built once per session for tests/train/test_resume.py, test_trainer.py and tests/assembly/test_artifacts.py;
    read only: a test that changes a run works on `run_copy`."""
    from bt_keras import paths
    from tests.helpers import trainer

    workdir = tmp_path_factory.mktemp("finished")
    trainer(workdir).run()
    assert [p.name for p in paths.latest_checkpoints(workdir)] == ["ckpt-0", "ckpt-3", "ckpt-6"]
    return workdir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of finished_run of this test's own."""
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    return workdir


@pytest.fixture(scope="session")
def converted_resnet50(tmp_path_factory):
    """The torch fixture's ResNet-50 converted once per session (bt_keras.interop.convert, 64 px, in-process): the
    encoder folder tests/assembly/test_plain_keras.py and tests/serving/test_onnx_export.py read. Read only. (The
    command-line conversion is tests/interop/test_convert.py's own.)"""
    from bt_keras.interop.convert import convert_torchvision_checkpoint
    from tests.helpers import TORCHVISION_FIXTURE

    folder = tmp_path_factory.mktemp("converted") / "r50"
    convert_torchvision_checkpoint(TORCHVISION_FIXTURE / "resnet50_random.pth", folder, image_size=64)
    return folder
