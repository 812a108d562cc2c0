"""Where a run in an existing workdir restarts: which checkpoint, what to repair first, and whether the config fits.

A resumed run must never start over silently, nor overwrite newer work. So, before anything is built:

1. `plan_resume(folder)` looks at `workdir/checkpoints` without changing it: the complete checkpoints (a
   `ckpt-N.index` and its data), newest first, each read in full (`checkpoints.verify`) until one passes. The
   `checkpoint` index file TensorFlow keeps is only a hint: when it is missing, garbage (TensorFlow then returns
   "no checkpoint" and the run would restart at step 0), or names an incomplete checkpoint, the newest complete one
   is used and the log says so. Checkpoint files with no complete checkpoint among them are an error, never step 0.
2. `check_config(...)` compares the run's saved `config.json` with the new config: fields that change the model or
   the data stream are an error listing old -> new, unless `allow_change` (`--allow_config_change`).
3. `apply_plan(plan)` then repairs, saying each step in the log: `ckpt-*_temp` folders a kill left behind are
   deleted (they are never a complete checkpoint); unusable checkpoints and orphan data files are moved (not
   deleted) to `checkpoints/unusable/<time>/`, so the resumed run can neither read nor overwrite them; the index
   file is rewritten to list the complete checkpoints.

Config files: `config.json` describes the run's latest start; every change between starts (also the harmless ones,
such as more epochs) is appended to `config_changes.jsonl` with the step it took effect at. A start that saves no
checkpoint before non-finite values stop it puts the previous config.json back (`undo_config_record`), so it stays
the config of the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import tensorflow as tf
from absl import logging

from bt_keras import checkpoints, files, paths
from bt_keras.config import complete

INDEX_FILE = "checkpoint"  # tf.train.CheckpointManager's index of a checkpoint folder

# Fields that may change when a run is resumed: bookkeeping, monitoring, where the data is read from, and how long
# to train (more epochs extend the run; the cosine schedule is then stretched from the resumed step on).
# Every other field changes the model, the optimisation or the data stream.
HARMLESS_FIELDS = frozenset({
    "name", "data_dir", "download", "epochs", "log_every_steps", "keep_checkpoints", "checkpoint_every_epochs",
    "picture_every_epochs", "report", "jit_compile", "fast_paths", "data_service_stall_s",
})
HARMLESS_PREFIXES = ("knn.",)


class ResumeError(ValueError):
    """The workdir holds checkpoint files but nothing the run can safely resume from."""


class ConfigChangedError(ValueError):
    """The new config changes fields that the resumed checkpoint depends on."""


@dataclasses.dataclass
class ResumePlan:
    """What `plan_resume` found in a checkpoint folder; `apply_plan` carries out the repairs."""

    folder: Path
    checkpoint: Path | None  # the checkpoint to restore (None: a fresh start)
    complete: list[Path]  # checkpoints to keep listing in the index, oldest first (the chosen one last)
    unusable: list[tuple[Path, str]] = dataclasses.field(default_factory=list)  # (file, reason), to move aside
    temp_folders: list[Path] = dataclasses.field(default_factory=list)  # partial saves a kill left, to delete
    index_problem: str | None = None  # why the index file cannot be trusted
    index_names: str | None = None  # the checkpoint the (readable) index file names

    @property
    def needs_repair(self) -> bool:
        return bool(self.unusable or self.temp_folders or self.index_problem
                    or (self.checkpoint is not None and self.index_names != self.checkpoint.name))


def _step(prefix: Path) -> int:
    return int(prefix.name.rsplit("-", 1)[1])


def _read_index(folder: Path, complete: list[Path]) -> tuple[str | None, str | None]:
    """(problem, name of the checkpoint the index file names) for `folder/checkpoint`."""
    path = folder / INDEX_FILE
    if not path.exists():
        return (f"{path} is missing" if complete else None), None
    try:
        state = tf.train.get_checkpoint_state(str(folder))
    except Exception as error:  # noqa: BLE001  binary garbage -> UnicodeDecodeError, ...
        return f"{path} is unreadable ({type(error).__name__}: {checkpoints.one_line(error, 120)})", None
    if state is None or not state.model_checkpoint_path:
        return f"{path} is not a checkpoint index (TensorFlow cannot parse it)", None
    named = Path(state.model_checkpoint_path).name
    if named not in {p.name for p in complete}:
        return f"{path} names {named}, which is not a complete checkpoint (no {named}.index)", named
    return None, named


def plan_resume(folder) -> ResumePlan:
    """Inspects checkpoint folder `folder` (changing nothing) and decides where the run restarts.

    Raises ResumeError when checkpoint files exist but none of them can be restored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return ResumePlan(folder, None, [])
    temp_folders = find_temp_folders(folder)
    complete = paths.latest_checkpoints(folder.parent)  # oldest first; .index present
    complete_names = {p.name for p in complete}
    orphans = sorted(p for p in folder.glob("ckpt-*") if p.is_file() and p.name.split(".", 1)[0] not in complete_names)
    index_problem, index_names = _read_index(folder, complete)
    unusable = [(p, f"{p.name.split('.', 1)[0]}.index is missing (an interrupted save, or a deleted file)")
                for p in orphans]

    chosen, bad = None, []
    for prefix in reversed(complete):
        try:
            checkpoints.verify(prefix)
        except checkpoints.CorruptCheckpointError as error:
            bad.append((prefix, str(error)))
            continue
        chosen = prefix
        break
    if chosen is None and (complete or orphans or index_names):
        found = [f"{p.name}: {reason}" for p, reason in bad] or [p.name for p in orphans] or [index_names]
        raise ResumeError(
            f"{folder} holds checkpoint files but no complete, readable checkpoint ({'; '.join(found)}), so the run "
            f"cannot resume and will not start over on its own. To start from step 0, move the folder away "
            f"(mv {folder} {folder}.broken); to resume, restore the files from a backup.")
    for prefix, reason in bad:
        unusable += [(p, reason) for p in [Path(f"{prefix}.index"), *checkpoints.data_files(prefix),
                                           paths.checkpoint_config(prefix)] if p.exists()]
    kept = [p for p in complete if chosen is not None and _step(p) <= _step(chosen)]
    return ResumePlan(folder, chosen, kept, sorted(unusable), temp_folders, index_problem, index_names)


def describe(plan: ResumePlan) -> list[str]:
    """The plan's repairs as log lines (warnings)."""
    lines = [f"Deleting {p}: an unfinished checkpoint save (the process was stopped while writing it)."
             for p in plan.temp_folders]
    if plan.index_problem and plan.checkpoint is not None:
        lines.append(f"{plan.index_problem}; recovering from the newest complete checkpoint, {plan.checkpoint}.")
    elif plan.index_problem:
        lines.append(f"{plan.index_problem}, and there are no checkpoint files beside it: it is moved to "
                     f"{plan.folder / paths.UNUSABLE_CHECKPOINTS}/ and the run starts from step 0.")
    elif plan.checkpoint is not None and plan.index_names != plan.checkpoint.name:
        lines.append(f"{plan.folder / INDEX_FILE} names {plan.index_names}, but {plan.checkpoint.name} is the newest "
                     "complete checkpoint; resuming from it.")
    bad = {}
    for path, reason in plan.unusable:
        bad.setdefault(reason, []).append(path.name)
    for reason, names in bad.items():
        lines.append(f"Unusable checkpoint file(s) {', '.join(names)}: {reason}. Falling back to "
                     f"{plan.checkpoint.name if plan.checkpoint else 'nothing'}; the file(s) are moved to "
                     f"{plan.folder / paths.UNUSABLE_CHECKPOINTS}/ (not deleted).")
    return lines


def find_temp_folders(folder) -> list[Path]:
    """The temporary folders of saves a kill cut short in checkpoint folder `folder` (TensorFlow's ckpt-N_temp*)."""
    return sorted(p for p in Path(folder).glob("ckpt-*_temp*") if p.is_dir())


def apply_plan(plan: ResumePlan) -> None:
    """Carries out the repairs of `plan` (see the module docstring), logging each one."""
    if not plan.needs_repair:
        return
    for line in describe(plan):
        logging.warning("%s", line)
    for path in plan.temp_folders:
        shutil.rmtree(path, ignore_errors=True)
    index = plan.folder / INDEX_FILE
    aside = [p for p, _ in plan.unusable]
    if plan.index_problem and plan.index_names is None and index.exists():
        aside.append(index)  # unreadable: kept for inspection (a readable one is simply rewritten below)
    if aside:
        target = plan.folder / paths.UNUSABLE_CHECKPOINTS / time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target.mkdir(parents=True, exist_ok=True)
        for path in aside:
            os.replace(path, target / path.name)
    if plan.checkpoint is not None:
        write_index(plan.folder, plan.checkpoint, plan.complete)


def write_index(folder: Path, latest: Path, listed: list[Path]) -> None:
    """Rewrites `folder/checkpoint` (TensorFlow's index, atomically) to name `latest` and list `listed`, oldest
    first, so a `tf.train.CheckpointManager` built on the folder afterwards manages exactly those checkpoints."""
    times = [Path(f"{p}.index").stat().st_mtime for p in listed]
    logger = tf.get_logger()  # TensorFlow's only public writer of the index warns it is deprecated, on every console
    level = logger.level
    logger.setLevel("ERROR")
    try:
        tf.compat.v1.train.update_checkpoint_state(
            str(folder), latest.name, all_model_checkpoint_paths=[p.name for p in listed],
            all_model_checkpoint_timestamps=times, last_preserved_timestamp=min(times) - 1.0)
    finally:
        logger.setLevel(level)


def prune_checkpoints(folder, keep: int, latest) -> list[Path]:
    """Deletes the complete checkpoints of `folder` other than `ckpt-0` and the `keep` newest (`latest`, the one
    just written, among them); returns the deleted prefixes.

    Why not CheckpointManager's `max_to_keep`: it deletes `ckpt-0` too, the random initialisation that evaluations
    and the baselines compare with. The index is rewritten first (listing only what stays), so a kill half-way
    leaves at worst a checkpoint's files the index no longer names, never an index naming deleted files."""
    folder, latest = Path(folder), Path(latest)
    complete = [p for p in paths.latest_checkpoints(folder.parent) if p.name != latest.name] + [folder / latest.name]
    newest = complete[-keep:]
    kept = [p for p in complete if p in newest or _step(p) == 0]
    dropped = [p for p in complete if p not in kept]
    if not dropped:
        return []
    write_index(folder, latest, kept)
    for prefix in dropped:
        for path in folder.glob(f"{prefix.name}.*"):  # .index, .data-*, and the config record beside them
            path.unlink(missing_ok=True)
    return dropped


# ------------------------------------------------------------------------------------------------- config


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _as_json(config) -> dict:
    """A config (ConfigDict or dict) as config.json stores it (tuples as lists, odd objects as strings)."""
    tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(tree, default=str))


def is_harmless(field: str) -> bool:
    return field in HARMLESS_FIELDS or field.startswith(HARMLESS_PREFIXES)


def config_changes(saved: dict, new) -> list[tuple[str, object, object]]:
    """(field, old, new) for every field whose value differs between a saved config.json and `new`, sorted.
    A field missing on one side shows as "<absent>"."""
    old, now = _flatten(_as_json(saved)), _flatten(_as_json(new))
    absent = "<absent>"
    return [(field, old.get(field, absent), now.get(field, absent)) for field in sorted(old.keys() | now.keys())
            if old.get(field, absent) != now.get(field, absent)]


def _show(changes) -> str:
    return ", ".join(f"{field}: {old!r} -> {new!r}" for field, old, new in changes)


def check_config(workdir, config, *, resuming_from: Path | None, allow_change: bool = False) -> list:
    """Compares `workdir/config.json` with `config` when the run resumes; returns the changes (field, old, new).

    Raises ConfigChangedError listing the fields that change the model, the optimisation or the data stream,
    unless `allow_change`. Without a checkpoint to resume from, nothing is compared (a fresh start).
    """
    path = Path(workdir) / paths.CONFIG_FILE
    if resuming_from is None:
        return []
    if not path.is_file():
        logging.warning("Resuming from %s, but the run's %s is missing: the new config cannot be compared with the "
                        "one that wrote the checkpoint (the restore still checks every variable).", resuming_from,
                        paths.CONFIG_FILE)
        return []
    saved = files.read_json(path, "The run's config")
    try:  # fields added since the run's config.json was written take their defaults, as the new config has them
        saved = complete(saved).to_dict() if isinstance(saved, dict) else saved
    except TypeError:
        pass  # a hand-edited value of the wrong type: compared as written, and shown as a change
    changes = config_changes(saved, config)
    _check_precision(changes, workdir)
    guarded = [change for change in changes if not is_harmless(change[0])]
    if guarded and not allow_change:
        raise ConfigChangedError(
            f"Resuming {workdir} from {resuming_from.name} with a config that changes the run: {_show(guarded)}. "
            f"These fields change the model, the optimisation or the data stream, so the checkpoint would not "
            f"continue the same run. Rerun with the values saved in {path}, use a new --workdir, or pass "
            f"--allow_config_change to resume with the new values anyway (recorded in "
            f"{paths.CONFIG_CHANGES_FILE}).")
    if guarded:
        logging.warning("--allow_config_change: resuming with changed fields %s.", _show(guarded))
    harmless = [change for change in changes if is_harmless(change[0])]
    if harmless:
        logging.info("Resuming with changed run settings: %s.", _show(harmless))
    return changes


def _check_precision(changes, workdir) -> None:
    """A change of `config.precision` into or out of mixed_float16 is refused even with --allow_config_change: the
    checkpoint holds the optimizer inside (or outside) its loss-scaling wrapper, so it cannot restore the other way."""
    change = next((change for change in changes if change[0] == "precision"), None)
    if change is None:
        return
    old, new = ("float32" if value == "<absent>" else value for value in change[1:])  # absent: before the field
    if "mixed_float16" in (old, new):
        flag = "with --mixed_precision" if old == "mixed_float16" else "without --mixed_precision"
        raise ConfigChangedError(
            f"Resuming {workdir} with config.precision={new!r}, but the run was trained with {old!r}: a checkpoint of "
            f"a mixed_float16 run holds its loss-scaling optimizer, so it cannot be resumed in another precision (nor "
            f"the reverse). Rerun {flag} (or --config.precision={old}), or start a new --workdir.")


def record_config(workdir, config, changes, step: int) -> None:
    """Writes `workdir/config.json` (atomically) and appends `changes` to `config_changes.jsonl`."""
    workdir = Path(workdir)
    _append_changes(workdir, {field: {"old": old, "new": new} for field, old, new in changes}, step)
    files.atomic_write_json(workdir / paths.CONFIG_FILE, config.to_dict())


def _append_changes(workdir: Path, changes: dict, step: int, **extra) -> None:
    """One line of `config_changes.jsonl`: the step the changes took effect at, the time, `changes`, `extra`."""
    if not changes:
        return
    line = {"step": int(step), "time": round(time.time(), 3), "changes": changes, **extra}
    with open(workdir / paths.CONFIG_CHANGES_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(line, default=str) + "\n")


def undo_config_record(workdir, previous: bytes, changes, step: int, checkpoint) -> str:
    """Puts back `previous` (the bytes of config.json before `record_config`) after a start that saved no checkpoint
    with its new config, e.g. one stopped by non-finite values; appends the reverse of `changes` to
    config_changes.jsonl. Returns the sentence that says so, for the error that stopped the run.

    Why: config.json must stay the config of the latest checkpoint, or the recipe that wrote it would be refused as a
    changed config on the next start (and the evaluation of the checkpoint compared against the wrong recipe)."""
    workdir = Path(workdir)
    files.atomic_write(workdir / paths.CONFIG_FILE, lambda tmp: Path(tmp).write_bytes(previous))
    _append_changes(workdir, {field: {"old": new, "new": old} for field, old, new in changes}, step,
                    reverted=f"no checkpoint was saved with these values; {paths.CONFIG_FILE} is again the config of "
                             f"{Path(checkpoint).name}")
    return (f"{workdir / paths.CONFIG_FILE} is again the config that wrote {Path(checkpoint).name}, so the run's "
            "previous command resumes it unchanged.")
