"""Resuming in a hostile workdir (issue 15, training side; bt_keras.train.resume): a missing, garbage or stale index,
a corrupt latest checkpoint, temp folders left by a kill, a changed config. Each case ends in a recovery said in the
log or in one clear line, never in a silent restart at step 0, a traceback or half-written files.

Most cases build a tiny Trainer in-process on a copy of one short run (conftest.py's `finished_run`: ckpt-0, ckpt-3,
ckpt-6); one goes through `python -m bt_keras.train` to check the exit code and the one-line message.
"""

import json
import os

import pytest
import tensorflow as tf

import bt_keras  # noqa: F401  (registers the classes saved models need)
from bt_keras import checkpoints, paths
from bt_keras.train import resume
from tests.helpers import flip_a_byte, last_error_line, resumed_step, train_command, trainer, tree_bytes
from tests.in_process import train_in_process

pytestmark = pytest.mark.hostile


# ------------------------------------------------------------------------------------------ resume: the index


@pytest.mark.slow
def test_missing_index_recovers_from_the_newest_complete_checkpoint(run_copy, caplog):
    (run_copy / "checkpoints" / "checkpoint").unlink()
    assert resumed_step(run_copy) == 6  # not 0: the run does not start over
    assert "checkpoints/checkpoint is missing; recovering from the newest complete checkpoint" in caplog.text
    assert tf.train.latest_checkpoint(str(run_copy / "checkpoints")).endswith("ckpt-6")  # the index is rewritten


@pytest.mark.slow
@pytest.mark.parametrize("garbage", [b"\xfe\xff\x00binary garbage\x9c" * 20, b"hello world\n"], ids=["binary", "text"])
def test_garbage_index_recovers_and_names_the_file(run_copy, caplog, garbage):
    index = run_copy / "checkpoints" / "checkpoint"
    index.write_bytes(garbage)
    assert resumed_step(run_copy) == 6  # before: 'utf-8' codec can't decode (binary), or step 0 (text)
    assert f"{index} is " in caplog.text and "recovering from the newest complete checkpoint" in caplog.text
    moved = list((run_copy / "checkpoints" / "unusable").glob("*/checkpoint"))
    assert [p.read_bytes() for p in moved] == [garbage]  # kept aside, not deleted


def test_newest_complete_checkpoint_wins_over_a_stale_index(run_copy, caplog):
    # A kill between writing ckpt-6 and updating the index: the index still names ckpt-3.
    tf.compat.v1.train.update_checkpoint_state(str(run_copy / "checkpoints"), "ckpt-3", ["ckpt-0", "ckpt-3"])
    assert resumed_step(run_copy) == 6
    assert "names ckpt-3, but ckpt-6 is the newest complete checkpoint" in caplog.text


def test_checkpoint_files_without_a_complete_checkpoint_are_an_error_not_step_0(run_copy):
    folder = run_copy / "checkpoints"
    for index in folder.glob("ckpt-*.index"):
        index.unlink()
    before = tree_bytes(run_copy)
    with pytest.raises(resume.ResumeError, match="no complete, readable checkpoint") as raised:
        trainer(run_copy)
    message = str(raised.value)
    assert str(folder) in message and f"mv {folder} {folder}.broken" in message and "\n" not in message
    assert tree_bytes(run_copy) == before  # nothing rewritten, no new ckpt-0, config.json untouched


# ------------------------------------------------------------------------------ resume: a corrupt latest checkpoint


def _truncate(folder):
    data = folder / "ckpt-6.data-00000-of-00001"
    os.truncate(data, 1000)
    return data.name


def _remove_index(folder):
    (folder / "ckpt-6.index").unlink()
    return "ckpt-6.index"


def _garbage_index(folder):
    (folder / "ckpt-6.index").write_bytes(os.urandom(3000))
    return "ckpt-6.index"


@pytest.mark.parametrize("damage", [_truncate, flip_a_byte, _remove_index, _garbage_index],
                         ids=["truncated-data", "bad-checksum", "missing-index", "garbage-index"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(run_copy, caplog, damage):
    folder = run_copy / "checkpoints"
    bad_file = damage(folder)
    damaged = {name: content for name, content in tree_bytes(folder).items() if name.startswith("ckpt-6")}
    assert resumed_step(run_copy) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(bad_file in w and "Falling back to ckpt-3" in w for w in warnings), warnings
    assert tf.train.latest_checkpoint(str(folder)).endswith("ckpt-3")
    # The damaged files are moved aside byte for byte: the resumed run can neither read nor overwrite them.
    aside = {p.name: p.read_bytes() for p in (folder / "unusable").glob("*/*")}
    assert aside == damaged
    assert not list(folder.glob("ckpt-6*"))


@pytest.mark.slow
def test_training_on_after_a_fallback_keeps_the_corrupt_checkpoint(run_copy):
    bad_name = _truncate(run_copy / "checkpoints")
    t = trainer(run_copy)
    assert t.start_step == 3
    t.run()
    assert tf.train.latest_checkpoint(str(run_copy / "checkpoints")).endswith("ckpt-6")  # written again from 3
    checkpoints.verify(run_copy / "checkpoints" / "ckpt-6")
    (kept,) = (run_copy / "checkpoints" / "unusable").glob(f"*/{bad_name}")
    assert kept.stat().st_size == 1000


def test_every_checkpoint_corrupt_is_an_error_naming_each_file(run_copy):
    folder = run_copy / "checkpoints"
    for data in folder.glob("ckpt-*.data-*"):
        os.truncate(data, 100)
    with pytest.raises(resume.ResumeError) as raised:
        trainer(run_copy)
    message = str(raised.value)
    for step in (0, 3, 6):
        assert f"ckpt-{step}.data-00000-of-00001" in message
    assert "mv " in message and "\n" not in message


def test_temp_folders_left_by_a_kill_are_deleted_on_the_next_start(run_copy, caplog, tmp_path):
    temp = run_copy / "checkpoints" / "ckpt-9_temp"
    temp.mkdir()
    (temp / "part-00000-of-00001.data-00000-of-00001.tempstate123").write_bytes(b"partial")
    assert resumed_step(run_copy) == 6
    assert not temp.exists() and f"Deleting {temp}" in caplog.text
    # Killed while writing ckpt-0 of a fresh run: only a temp folder; the run starts from step 0 without it.
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints" / "ckpt-0_temp").mkdir(parents=True)
    assert resumed_step(fresh) == 0
    assert not (fresh / "checkpoints" / "ckpt-0_temp").exists()


# ------------------------------------------------------------------------------------- resume: a changed config


def test_a_changed_model_or_stream_field_is_an_error_listing_old_and_new(run_copy):
    before = tree_bytes(run_copy)
    with pytest.raises(resume.ConfigChangedError) as raised:
        trainer(run_copy, projector="64-64-64", batch_size=16)
    message = str(raised.value)
    assert "projector: '64-64' -> '64-64-64'" in message and "batch_size: 32 -> 16" in message
    assert "--allow_config_change" in message and "\n" not in message
    assert tree_bytes(run_copy) == before  # config.json and the checkpoints untouched


def test_a_config_json_written_before_a_field_existed_resumes_as_the_same_run(run_copy):
    """A run's config.json lacks the fields added after it was written; they take their defaults (what the new
    config has), so resuming is not refused as a changed run."""
    path = run_copy / "config.json"
    saved = json.loads(path.read_text())
    for field in ("dct_scaling", "projector_bias", "precision"):
        del saved[field]
    path.write_text(json.dumps(saved))
    assert resumed_step(run_copy) == 6


@pytest.mark.slow
def test_harmless_changes_resume_and_are_recorded(run_copy):
    old_k = json.loads((run_copy / "config.json").read_text())["knn"]["k"]
    t = trainer(run_copy, epochs=3, log_every_steps=5, knn=dict(every_epochs=0, k=old_k + 7))
    assert t.start_step == 6
    t.run()
    assert json.loads((run_copy / "config.json").read_text())["epochs"] == 3
    (line,) = (run_copy / "config_changes.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["step"] == 6
    assert record["changes"]["epochs"] == {"old": 2, "new": 3}
    assert record["changes"]["knn.k"] == {"old": old_k, "new": old_k + 7}


@pytest.mark.slow
def test_allow_config_change_resumes_with_a_new_stream_and_records_it(run_copy):
    saved = json.loads((run_copy / "config.json").read_text())
    t = trainer(run_copy, allow_config_change=True, seed=7)
    assert t.start_step == 6
    t.run()
    assert json.loads((run_copy / "config.json").read_text())["seed"] == 7
    assert saved["seed"] == 0
    record = json.loads((run_copy / "config_changes.jsonl").read_text())
    assert record["changes"] == {"seed": {"old": 0, "new": 7}}


@pytest.mark.parametrize("overrides, expected", [
    (dict(projector="64-64-64"), "model.projector: 6 in the checkpoint, 11 in the model"),
    (dict(width_multiplier=0.25), "incompatible tensor with shape"),
])
def test_restoring_into_another_model_fails_naming_what_differs(run_copy, overrides, expected):
    with pytest.raises(checkpoints.CheckpointMismatchError) as raised:
        trainer(run_copy, allow_config_change=True, **overrides)
    message = str(raised.value)
    assert expected in message and "ckpt-6" in message and "\n" not in message
    assert not (run_copy / paths.LOCK_FILE).exists()  # released on the way out


def test_cli_resume_with_a_changed_projector_is_one_line_exit_2(run_copy):
    before = (run_copy / "config.json").read_bytes()
    result = train_in_process(train_command(run_copy, "--config.projector=64-64-64")[3:])
    assert result.returncode == 2, result.stderr[-3000:]
    line = last_error_line(result.stderr)
    assert "projector: '64-64' -> '64-64-64'" in line and "--allow_config_change" in line
    assert "Value in checkpoint could not be found" not in result.stderr  # no page of TensorFlow warnings
    assert (run_copy / "config.json").read_bytes() == before
