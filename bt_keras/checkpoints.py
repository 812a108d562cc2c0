"""Reading tf.train checkpoints safely: is one complete and readable, and does it restore every variable?

TensorFlow's own checks are weaker than a resumed run or an evaluation needs:

* A truncated data file, a flipped byte (crc32c mismatch), a missing or garbage `.index` surface only when the
  values are read, as `IndexError`, `DataLossError`, `NotFoundError` or "not an sstable". `verify` reads every
  value once and names the file that failed.
* `restore(...).assert_existing_objects_matched()` passes when the checkpoint holds values the model no longer has
  (a changed projector restores "partially", with a page of warnings at exit), and `expect_partial()` accepts
  anything. `restore_exactly` requires a one-to-one match and `restore_encoder` checks the encoder alone (for
  evaluation, where optimizer state and projector may be ignored); both fail with counts per part and
  TensorFlow's first line, not a wall of warnings.

A checkpoint says nothing of the model it was written from, and evaluating one rebuilds that model from the run's
config.json, which a user may have edited since: an encoder built at another image size restores fine and gives wrong
numbers. So the trainer writes the run's config beside each checkpoint (`write_config_record`), and
`config_record_differences` names the encoder fields config.json changed before anything is built.

Counting variables per part reads the checkpoint's object graph (the `TrackableObjectGraph` proto TensorFlow
stores in every object-based checkpoint), so it needs no model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import tensorflow as tf

from bt_keras import files, paths
from bt_keras.config import complete

_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


class CorruptCheckpointError(ValueError):
    """A checkpoint whose files are missing, truncated or fail their checksum."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint that does not hold exactly the variables of the model it is restored into."""


def data_files(prefix) -> list[Path]:
    """The data shards of checkpoint `prefix` that exist (`prefix.data-00000-of-00001`, ...)."""
    prefix = Path(prefix)
    return sorted(prefix.parent.glob(f"{prefix.name}.data-*"))


def one_line(error: BaseException, limit: int = 300) -> str:
    """An error message on one line, cut at `limit` characters (TensorFlow's run over many lines)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def verify(prefix) -> None:
    """Reads every value of checkpoint `prefix`; raises CorruptCheckpointError naming the bad file.

    The index (`prefix.index`) is read first, then each value from the data files, whose checksums TensorFlow
    checks on read. Costs one read of the checkpoint.
    """
    prefix = Path(prefix)
    index = Path(f"{prefix}.index")
    if not index.is_file():
        raise CorruptCheckpointError(f"{index} is missing")
    try:
        reader = tf.train.load_checkpoint(str(prefix))
        names = list(reader.get_variable_to_shape_map())
    except Exception as error:  # noqa: BLE001  TF raises OpError subclasses, IndexError, ... for a bad index
        raise CorruptCheckpointError(f"{index} is unreadable ({one_line(error)})") from None
    shards = data_files(prefix)
    try:
        for name in names:
            reader.get_tensor(name)
    except Exception as error:  # noqa: BLE001  truncation -> IndexError, bad checksum -> DataLossError, ...
        files = ", ".join(str(p) for p in shards) or f"{prefix}.data-* (none found)"
        raise CorruptCheckpointError(f"{files} is unreadable ({one_line(error)})") from None


def _object_graph(prefix):
    from tensorflow.core.protobuf import trackable_object_graph_pb2  # the proto TF writes into every checkpoint

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(tf.train.load_checkpoint(str(prefix)).get_tensor(_OBJECT_GRAPH_KEY))
    return graph


def variable_count(prefix, path: tuple[str, ...] = ()) -> int | None:
    """How many variables checkpoint `prefix` holds under the object path `path` (e.g. ("model", "encoder"));
    None when the path is not in the checkpoint. A variable reachable along several paths counts once."""
    graph = _object_graph(prefix)
    node = 0  # the root
    for name in path:
        children = {child.local_name: child.node_id for child in graph.nodes[node].children}
        if name not in children:
            return None
        node = children[name]
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(child.node_id for child in graph.nodes[current].children)
    return sum(1 for n in seen if graph.nodes[n].attributes)


def _count_report(prefix, parts: dict[tuple[str, ...], int]) -> str:
    """'encoder: 30 in the checkpoint, 30 in the model; ...' for each part whose counts differ (all if none do)."""
    try:
        rows = [(".".join(path), variable_count(prefix, path), count) for path, count in parts.items()]
    except Exception:  # noqa: BLE001  the counts only decorate the message
        return ""
    differing = [row for row in rows if row[1] != row[2]] or rows
    return "; ".join(f"{name}: {'none' if saved is None else saved} in the checkpoint, {built} in the model"
                     for name, saved, built in differing)


def _mismatch_detail(error: BaseException) -> str:
    """TensorFlow's complaint, shortened: the unmatched variables' paths rather than their printed values."""
    text = str(error)
    paths = re.findall(r"path=([^,>\s]+)", text)
    if paths:
        count = re.search(r"Found (\d+) Python objects", text)
        total = count.group(1) if count else len(paths)
        return f"{total} variables of the model have no value in it, e.g. {', '.join(paths[:6])}"
    return one_line(error, 200)


def restore_exactly(checkpoint: tf.train.Checkpoint, prefix, parts: dict[tuple[str, ...], int], fix: str) -> None:
    """Restores `prefix` into `checkpoint` and requires every value to find its variable and vice versa.

    `parts` maps object paths of the checkpoint to the number of variables the live objects have there (for the
    message only), e.g. {("model", "encoder"): len(model.encoder.variables)}. `fix` ends the message.
    Raises CheckpointMismatchError naming what differs, CorruptCheckpointError if the files cannot be read.
    """
    status = None
    try:
        status = checkpoint.restore(str(prefix))
        status.assert_consumed()
    except (AssertionError, ValueError) as error:  # unmatched objects / incompatible shapes
        if status is not None:
            status.expect_partial()  # our error says it; no page of TensorFlow warnings at exit
        counts = _count_report(prefix, parts)
        raise CheckpointMismatchError(
            f"Checkpoint {prefix} does not hold exactly the variables of the model built from the config"
            f"{' (' + counts + ')' if counts else ''}: {_mismatch_detail(error)}. {fix}") from None
    except (tf.errors.OpError, IndexError) as error:
        raise CorruptCheckpointError(f"Checkpoint {prefix} could not be read ({one_line(error)}).") from None


def restore_encoder(encoder, prefix, fix: str) -> None:
    """Restores the encoder of a training checkpoint (`model.encoder` in it) into `encoder`, requiring every
    encoder variable to be restored and every encoder value of the checkpoint to be used; the optimizer and
    projector values in the checkpoint are ignored. Raises CheckpointMismatchError otherwise."""
    expected = len(encoder.variables)
    status = None
    try:
        status = tf.train.Checkpoint(model=tf.train.Checkpoint(encoder=encoder)).read(str(prefix))
        status.assert_existing_objects_matched()
        saved = variable_count(prefix, ("model", "encoder"))
        if saved != expected:
            raise AssertionError(f"the checkpoint's encoder has {saved} variables, the model's {expected}")
    except (AssertionError, ValueError) as error:
        raise CheckpointMismatchError(
            f"Checkpoint {prefix} does not fit the encoder built from the config: {one_line(error, 250)}. "
            f"{fix}") from None
    except (tf.errors.OpError, IndexError) as error:
        raise CorruptCheckpointError(f"Checkpoint {prefix} could not be read ({one_line(error)}).") from None
    finally:
        if status is not None:
            status.expect_partial()  # optimizer and projector values are deliberately left unread


# ------------------------------------------------------------------------------------- the config beside a checkpoint

# The fields that shape the encoder a checkpoint holds, or the images it is fed: a checkpoint's evaluation builds the
# encoder from them, so they must be what they were when the checkpoint was written. (The projector, the optimizer
# and the data stream do not change the encoder's features; normalisation is compared through the dataset.)
ENCODER_FIELDS = ("backbone", "backbone_options", "stem", "width_multiplier", "blocks", "image_size")


def write_config_record(prefix, config: dict) -> Path:
    """Writes `config` (the run's complete config, as a dict) as `prefix.config.json`, atomically; returns its path.
    Called before the checkpoint itself is written, so every complete checkpoint has its record."""
    path = paths.checkpoint_config(prefix)
    files.atomic_write_json(path, config)
    return path


def read_config_record(prefix) -> dict | None:
    """The config recorded beside checkpoint `prefix`, every field completed with its default; None for a checkpoint
    written before records existed (or whose record is not a config)."""
    path = paths.checkpoint_config(prefix)
    if not path.is_file():
        return None
    try:
        recorded = files.read_json(path, "The checkpoint's config record")
    except ValueError as error:
        raise CorruptCheckpointError(str(error)) from None
    return _plain(complete(recorded).to_dict()) if isinstance(recorded, dict) else None


def config_record_differences(recorded: dict, config: dict, fields=ENCODER_FIELDS) -> list[tuple[str, object, object]]:
    """(field, recorded value, value in `config`) for each of `fields` that differs, in `fields`' order. Both are
    complete configs; lists and tuples compare equal, as they do once written as JSON."""
    config = _plain(config)
    return [(field, recorded.get(field), config.get(field)) for field in fields
            if recorded.get(field) != config.get(field)]


def _plain(tree: dict) -> dict:
    """`tree` as JSON would give it back (tuples as lists, other objects as strings), so values compare as written."""
    return json.loads(json.dumps(tree, default=str))
