"""Training in a hostile workdir (issue 15, training side): broken resumes, two trainers, changed configs, bad fields,
undecodable data and a full disk. Each case ends in a recovery said in the log or in one clear line, never in a
silent restart at step 0, a traceback or half-written files.

Most cases build a tiny Trainer in-process on a copy of one short run (ckpt-0, ckpt-3, ckpt-6); a few go through
`python -m bt_keras.train` to check exit codes and one-line messages.
"""

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import bt_keras  # noqa: F401  (registers the classes saved models need)
from bt_keras import checkpoints, files, paths
from bt_keras.assembly import artifacts
from bt_keras.train import preflight, resume, workdir_lock
from bt_keras.train.trainer import DiskFullError, Trainer
from bt_keras.train.workdir_lock import WorkdirLock, WorkdirLockedError
from tests.test_train import REPO, run_cli, start_local_workers, tiny_config, train_command

PROBES = REPO / "tests" / "probes"
STRATEGY = tf.distribute.get_strategy()


def trainer(workdir, allow_config_change=False, **overrides) -> Trainer:
    return Trainer(tiny_config(**overrides), workdir, STRATEGY, allow_config_change=allow_config_change)


def resumed_step(workdir, **overrides) -> int:
    t = trainer(workdir, **overrides)
    t.close()
    return t.start_step


def tree_bytes(folder) -> dict:
    """{relative path: bytes} of every file under folder."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def last_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished two-epoch run of three steps: checkpoints 0, 3 and 6, encoder.keras at step 6."""
    workdir = tmp_path_factory.mktemp("finished")
    trainer(workdir).run()
    assert [p.name for p in paths.latest_checkpoints(workdir)] == ["ckpt-0", "ckpt-3", "ckpt-6"]
    return workdir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    return workdir


# ------------------------------------------------------------------------------------------ resume: the index


def test_missing_index_recovers_from_the_newest_complete_checkpoint(run_copy, caplog):
    (run_copy / "checkpoints" / "checkpoint").unlink()
    assert resumed_step(run_copy) == 6  # not 0: the run does not start over
    assert "checkpoints/checkpoint is missing; recovering from the newest complete checkpoint" in caplog.text
    assert tf.train.latest_checkpoint(str(run_copy / "checkpoints")).endswith("ckpt-6")  # the index is rewritten


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


def _flip_a_byte(folder):
    data = folder / "ckpt-6.data-00000-of-00001"
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0xFF
    data.write_bytes(bytes(content))
    return data.name


def _remove_index(folder):
    (folder / "ckpt-6.index").unlink()
    return "ckpt-6.index"


def _garbage_index(folder):
    (folder / "ckpt-6.index").write_bytes(os.urandom(3000))
    return "ckpt-6.index"


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte, _remove_index, _garbage_index],
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
    result = run_cli(train_command(run_copy, "--config.projector=64-64-64"), timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    line = last_error_line(result.stderr)
    assert "projector: '64-64' -> '64-64-64'" in line and "--allow_config_change" in line
    assert "Value in checkpoint could not be found" not in result.stderr  # no page of TensorFlow warnings
    assert (run_copy / "config.json").read_bytes() == before


# ------------------------------------------------------------------- evaluating a checkpoint with its config.json


def _edit_config(workdir, **fields):
    path = workdir / "config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("fields, expected", [
    (dict(blocks=[1]), "the checkpoint's encoder has 30 variables, the model's"),  # fewer layers: no shape error
    (dict(width_multiplier=0.25), "incompatible tensor with shape"),
])
def test_evaluating_a_checkpoint_with_a_disagreeing_config_fails(run_copy, fields, expected):
    _edit_config(run_copy, **fields)
    with pytest.raises(checkpoints.CheckpointMismatchError) as raised:
        artifacts.open_encoder(run_copy / "checkpoints" / "ckpt-6")
    assert expected in str(raised.value) and "config.json" in str(raised.value)


def test_evaluating_a_corrupt_checkpoint_names_it(run_copy):
    _flip_a_byte(run_copy / "checkpoints")
    with pytest.raises(checkpoints.CorruptCheckpointError, match="ckpt-6 could not be read.*Checksum does not match"):
        artifacts.open_encoder(run_copy / "checkpoints" / "ckpt-6")


def test_evaluating_a_checkpoint_restores_every_encoder_variable(run_copy):
    # The projector is not part of the encoder: a config.json that disagrees only there still gives the encoder,
    # with exactly the weights the run saved at step 6 (its encoder.keras, written by Keras, is the reference).
    _edit_config(run_copy, projector="64-64-64")
    encoder = artifacts.open_encoder(run_copy / "checkpoints" / "ckpt-6").model
    reference = keras.models.load_model(run_copy / "encoder.keras").get_weights()
    restored = encoder.get_weights()
    assert len(restored) == len(reference) == 30
    assert all(np.array_equal(a, b) for a, b in zip(restored, reference))


# ----------------------------------------------------------------------------------------------- the workdir lock


def _hold_lock(workdir):
    process = subprocess.Popen([sys.executable, str(PROBES / "hold_workdir_lock.py"), str(workdir)], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_trainer_stops_at_once_naming_the_holder(tmp_path):
    holder = _hold_lock(tmp_path)
    try:
        tic = time.perf_counter()
        with pytest.raises(WorkdirLockedError) as raised:
            trainer(tmp_path)
        assert time.perf_counter() - tic < 2.0  # before anything is built
        message = str(raised.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert str(tmp_path / paths.LOCK_FILE) in message and "another --workdir" in message
        assert not (tmp_path / "checkpoints").exists()

        result = run_cli(train_command(tmp_path), timeout=120)
        assert result.returncode == 2
        assert f"pid {holder.pid}" in last_error_line(result.stderr)
    finally:
        holder.communicate(input="", timeout=30)  # closes its stdin: it releases and exits
    assert not (tmp_path / paths.LOCK_FILE).exists()


def test_a_planted_lock_symlink_or_folder_is_refused_and_nothing_is_overwritten(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("precious")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / paths.LOCK_FILE).symlink_to(victim)
    with pytest.raises(WorkdirLockedError, match="is a symlink"):
        WorkdirLock(tmp_path / "a" / paths.LOCK_FILE).acquire()
    assert victim.read_text() == "precious"
    (tmp_path / "b" / paths.LOCK_FILE).mkdir(parents=True)
    with pytest.raises(WorkdirLockedError, match="is a folder"):
        WorkdirLock(tmp_path / "b" / paths.LOCK_FILE).acquire()


def test_a_lock_left_by_a_killed_trainer_is_taken_over(tmp_path, caplog):
    holder = _hold_lock(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    lock = tmp_path / paths.LOCK_FILE
    assert json.loads(lock.read_text())["pid"] == holder.pid  # the dead trainer's lock file is still there
    t = trainer(tmp_path, epochs=1, steps_per_epoch=1)
    assert f"Taking over the lock {lock} left by pid {holder.pid}" in caplog.text
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    t.run()
    assert not lock.exists()  # released when the run ends


def test_two_trainers_in_one_process_conflict_until_the_first_is_closed(tmp_path):
    first = trainer(tmp_path)
    with pytest.raises(WorkdirLockedError, match="already being trained by this process"):
        trainer(tmp_path)
    first.close()
    assert resumed_step(tmp_path) == 0


def test_without_flock_a_dead_holder_is_stale_and_a_live_one_is_not(tmp_path, monkeypatch, caplog):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(workdir_lock.fcntl, "flock", no_flock)
    path = tmp_path / paths.LOCK_FILE
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "earlier"}))
    with WorkdirLock(path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"Taking over the stale lock {path} left by pid {dead.pid}" in caplog.text
    assert not path.exists()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid}))
        with pytest.raises(WorkdirLockedError, match=f"pid {live.pid}"):
            WorkdirLock(path).acquire()
        path.write_text(json.dumps({"host": "another-host", "pid": dead.pid}))  # cannot be told: not taken
        with pytest.raises(WorkdirLockedError, match="another-host"):
            WorkdirLock(path).acquire()
    finally:
        live.kill()
        live.wait()


@pytest.mark.slow
def test_multi_worker_run_shares_its_workdir_and_still_keeps_others_out(tmp_path):
    """Two workers of one run share the workdir (only the chief locks it); a third trainer is kept out."""
    processes = start_local_workers(tmp_path, epochs=2, steps=6)
    try:
        deadline = time.time() + 120
        while not (tmp_path / paths.LOCK_FILE).exists() and time.time() < deadline:
            time.sleep(0.1)
        holder = json.loads((tmp_path / paths.LOCK_FILE).read_text())
        intruder = run_cli(train_command(tmp_path), timeout=120)
        outputs = [p.communicate(timeout=300) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
        assert "Finished at step 12" in out
    assert holder["pid"] == processes[0].pid  # the chief (worker 0) holds the lock, worker 1 does not need it
    assert intruder.returncode == 2 and f"pid {processes[0].pid}" in last_error_line(intruder.stderr)
    assert not (tmp_path / paths.LOCK_FILE).exists()


@pytest.mark.slow
def test_two_trainers_started_together_one_runs_one_stops(tmp_path):
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    processes = [subprocess.Popen(train_command(tmp_path, epochs=1, steps=6), cwd=REPO, env=environment,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in processes]
    codes = sorted(p.returncode for p in processes)
    assert codes == [0, 2], [err[-2000:] for _, err in outputs]
    loser = next(err for p, (_, err) in zip(processes, outputs) if p.returncode == 2)
    assert "is in use by another training run" in last_error_line(loser)
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("start") == 1  # one run's log, not two interleaved


# ---------------------------------------------------------------------------- crash-style exits (item 7)


@pytest.mark.parametrize("override, expected", [
    ("--config.nope=1", "--config.nope=1: the config has no field 'nope'"),
    ("--config.image_sise=32", "Did you mean --config.image_size"),
    ("--config.knn.nope=1", "no field 'knn.nope'"),
])
def test_an_unknown_config_field_is_one_line_exit_2(tmp_path, override, expected):
    result = run_cli(train_command(tmp_path / "run", override), timeout=120)
    assert result.returncode == 2
    assert expected in last_error_line(result.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, field", [
    (dict(image_size=0), "config.image_size=0"),
    (dict(image_size=1), "config.image_size=1"),
    (dict(view1=dict(crop_size=24)), "config.view1.crop_size=24"),
    (dict(checkpoint_every_epochs=0), "config.checkpoint_every_epochs=0"),
    (dict(epochs=0), "config.epochs=0"),
    (dict(keep_checkpoints=0), "config.keep_checkpoints=0"),
    (dict(projector="64-x"), "config.projector='64-x'"),
    (dict(lambd=0.0), "config.lambd=0.0"),
    (dict(backbone="resnet7"), "config.backbone='resnet7'"),
    (dict(stem="cifar_pad3"), "config.stem='cifar_pad3'"),
    (dict(image_size=100_000), "config.image_size=100000"),  # 2 x 32 x 100000^2 x 3 floats: far beyond any RAM
])
def test_bad_field_values_fail_before_anything_is_written(tmp_path, overrides, field):
    config = tiny_config()
    for name, value in overrides.items():
        if isinstance(value, dict):
            config[name].update(value)
        else:
            config[name] = value
    with pytest.raises(ValueError, match="Invalid config") as raised:
        Trainer(config, tmp_path / "run", STRATEGY)
    assert field in str(raised.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_every_recipe_passes_the_config_check():
    import runpy

    for recipe in sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.py")):
        module = runpy.run_path(str(recipe))
        if "get_config" in module:
            assert preflight.config_problems(module["get_config"]()) == [], recipe.name


def test_a_small_image_size_trains(tmp_path):
    # image_size=7 was reported to fail inside the graph; the padded stride-2 layers take any size >= 1.
    for size in (preflight.MIN_IMAGE_SIZE, 7):
        t = trainer(tmp_path / f"s{size}", image_size=size, epochs=1, steps_per_epoch=1)
        logs = t.run()
        assert np.isfinite(logs["loss"]) and t.step == 1
        assert t._step_fn.experimental_get_tracing_count() == 1  # the trace before ckpt-0 is the one that runs


def test_cli_image_size_0_is_one_line_exit_2_and_writes_nothing(tmp_path):
    result = run_cli(train_command(tmp_path / "run", "--config.image_size=0"), timeout=120)
    assert result.returncode == 2
    assert "config.image_size=0 must be an integer >= 2" in last_error_line(result.stderr)
    assert not (tmp_path / "run").exists()


def test_a_step_that_cannot_be_built_leaves_no_checkpoint(tmp_path, monkeypatch):
    # A mistake the field checks do not know: the first step is traced before ckpt-0 and config.json are written.
    monkeypatch.setattr(preflight, "config_problems", lambda config: [])
    config = tiny_config()
    config.view1.crop_size = 24  # the views crop 24 px for a 32 px encoder
    t = Trainer(config, tmp_path, STRATEGY)
    with pytest.raises(Exception):
        t.run()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()
    assert not (tmp_path / paths.LOCK_FILE).exists()


def _png(rng, size=12) -> bytes:
    return tf.io.encode_png(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).numpy()


def _image_folder(root, good: int, broken: int):
    rng = np.random.default_rng(0)
    for i in range(good + broken):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        content = _png(rng)
        if i >= good:  # a PNG header, then garbage: passes the scan, fails to decode
            content = content[:16] + b"\x00garbage" * 20
        (folder / f"{i:03d}.png").write_bytes(content)
    return root


@pytest.mark.parametrize("good, broken, expected", [
    (0, 40, "fewer than config.batch_size=32 of its 40 image files decode"),
    (20, 20, "fewer than config.batch_size=32 of its 40 image files decode"),
    (10, 0, "config.batch_size=32 is larger than the 10 images"),
])
def test_folder_data_without_a_decodable_batch_is_a_clear_error(tmp_path, good, broken, expected):
    data_root = _image_folder(tmp_path / "images", good, broken)
    with pytest.raises(ValueError) as raised:
        trainer(tmp_path / "run", dataset=f"folder:{data_root}")
    assert expected in str(raised.value) and f"config.dataset='folder:{data_root}'" in str(raised.value)
    assert not (tmp_path / "run").exists()


def test_cli_folder_of_undecodable_images_is_one_line_exit_2(tmp_path):
    data_root = _image_folder(tmp_path / "images", 0, 40)
    result = run_cli(train_command(tmp_path / "run", f"--config.dataset=folder:{data_root}"), timeout=180)
    assert result.returncode == 2
    assert "decode" in last_error_line(result.stderr) and "StopIteration" not in result.stderr


# ----------------------------------------------------------------------------------------------- a full disk


def test_is_disk_full_reads_errno_chains_and_tensorflow_messages():
    assert files.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert files.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as inner:
            raise ValueError("could not save the model") from inner
    except ValueError as outer:
        assert files.is_disk_full(outer)
    assert files.is_disk_full(tf.errors.ResourceExhaustedError(None, None, "ckpt-9_temp/part: No space left on device"))
    assert not files.is_disk_full(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor"))
    assert not files.is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_disk_full_on_save_keeps_the_previous_checkpoint(run_copy, monkeypatch):
    """In-process: the checkpoint save fails as TensorFlow fails on a full disk, after leaving its temp folder."""
    folder = run_copy / "checkpoints"
    t = trainer(run_copy, epochs=3)

    def full_disk_save(checkpoint_number=None, **kwargs):
        (folder / f"ckpt-{checkpoint_number}_temp").mkdir()
        (folder / f"ckpt-{checkpoint_number}.data-00000-of-00001").write_bytes(b"partial")
        raise tf.errors.ResourceExhaustedError(None, None, f"{folder}/ckpt-9_temp/part-00000: No space left on device")

    monkeypatch.setattr(t.manager, "save", full_disk_save)
    with pytest.raises(DiskFullError) as raised:
        t.run()
    message = str(raised.value)
    assert f"--workdir={run_copy}" in message and "ckpt-6, is intact" in message and "\n" not in message
    assert not list(folder.glob("ckpt-9*"))  # no half-written checkpoint left
    assert tf.train.latest_checkpoint(str(folder)).endswith("ckpt-6")
    checkpoints.verify(folder / "ckpt-6")
    assert not (run_copy / paths.LOCK_FILE).exists()


def test_disk_full_on_config_json_is_a_disk_full_error(run_copy, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    t = trainer(run_copy, epochs=3)
    monkeypatch.setattr(resume.files, "atomic_write_json", full)
    with pytest.raises(DiskFullError, match="No space left on the disk of --workdir"):
        t.run()


def _mount_tmpfs(path, size) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_cli_on_a_really_full_disk_is_one_line_exit_2_and_resumes_after(finished_run, tmp_path):
    """On a real full file system (a 2 MiB tmpfs; needs root): the run fails saving ckpt-9, says so in one line,
    leaves ckpt-6 intact and nothing half-written, and resumes from ckpt-6 once space is freed."""
    mount = tmp_path / "small_disk"
    if not _mount_tmpfs(mount, "2m"):
        pytest.skip("needs root and tmpfs to make a small file system")
    try:
        workdir = mount / "run"
        shutil.copytree(finished_run, workdir)
        free = shutil.disk_usage(mount).free
        (mount / "filler").write_bytes(b"\0" * (free - 40 * 1024))  # leaves 40 KiB; a checkpoint needs ~95
        result = run_cli(train_command(workdir, epochs=3), timeout=240)
        assert result.returncode == 2, result.stderr[-3000:]
        line = last_error_line(result.stderr)
        assert f"--workdir={workdir}" in line and "No space left" in line and "ckpt-6, is intact" in line
        folder = workdir / "checkpoints"
        assert not list(folder.glob("ckpt-9*")), sorted(p.name for p in folder.iterdir())
        assert tf.train.latest_checkpoint(str(folder)).endswith("ckpt-6")
        checkpoints.verify(folder / "ckpt-6")
        assert not list(workdir.glob(".*.tmp*"))  # no half-written artefact either

        (mount / "filler").unlink()
        result = run_cli(train_command(workdir, epochs=3), timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        assert re.search(r"^Resuming from .*ckpt-6 at step 6\.$", result.stdout, re.M), result.stdout
        assert "Finished at step 9" in result.stdout
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
