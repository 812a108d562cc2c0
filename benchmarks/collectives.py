"""What a traced step sends between replicas, read from its op graph: every collective op, its tensor and its bytes.

Used by the benchmarks and tests to measure (not only compute) the communication of a training step: trace the step
(`tf.function(...).get_concrete_function(...)`), then `collective_ops(concrete.graph)` lists each collective op in it
and in the functions it calls, with its static input shape, dtype, group size and device.

Bytes sent per replica are counted as a ring algorithm sends them (what collective implementations use for large
tensors): an all-reduce of n bytes sends 2 (R - 1) / R * n from each replica (reduce-scatter, then all-gather, of
R chunks), an all-gather of an n-byte input (output R n) sends (R - 1) n, a reduce-scatter of an n-byte input sends
(R - 1) / R * n, a broadcast of n bytes sends n from the source. `bt_keras.method.loss_forms` uses the same counts for its
cost model, so the two can be compared.
"""

from __future__ import annotations

import dataclasses
import re

import tensorflow as tf

# Op type -> kind. V1 ops carry group_size as an attribute, V2/V3 as their second input.
KINDS = {
    "CollectiveReduce": "all_reduce", "CollectiveReduceV2": "all_reduce", "CollectiveReduceV3": "all_reduce",
    "NcclAllReduce": "all_reduce",
    "CollectiveGather": "all_gather", "CollectiveGatherV2": "all_gather",
    "CollectiveReduceScatterV2": "reduce_scatter",
    "CollectiveBcastSend": "broadcast", "CollectiveBcastSendV2": "broadcast",
    "CollectiveAllToAllV2": "all_to_all", "CollectiveAllToAllV3": "all_to_all",
}


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
    """One collective op of a graph: its type, kind, input tensor (static shape), group size and device."""

    name: str
    type: str
    kind: str
    shape: tuple
    dtype: str
    group_size: int | None
    device: str
    replica: int | None  # the op's device's index among the devices the collectives run on

    @property
    def elements(self) -> int:
        """Elements of the op's input (this replica's contribution)."""
        count = 1
        for dim in self.shape:
            count *= int(dim)
        return count

    @property
    def input_bytes(self) -> int:
        return self.elements * tf.as_dtype(self.dtype).size

    def bytes_sent(self) -> float:
        """Bytes this replica sends for the op under a ring algorithm (see the module docstring)."""
        r = self.group_size or 1
        if r == 1:
            return 0.0
        factor = {"all_reduce": 2 * (r - 1) / r, "all_gather": r - 1, "reduce_scatter": (r - 1) / r,
                  "broadcast": 1.0, "all_to_all": (r - 1) / r}[self.kind]
        return factor * self.input_bytes


def _group_size(op) -> int | None:
    if "group_size" in op.node_def.attr:
        return int(op.get_attr("group_size"))
    if op.type == "NcclAllReduce":
        return int(op.get_attr("num_devices"))
    value = tf.get_static_value(op.inputs[1]) if len(op.inputs) > 1 else None
    return None if value is None else int(value)


def _called_graphs(op):
    """The FuncGraphs of the functions `op` calls (PartitionedCall, If, While, ...), where they can be resolved."""
    for attr in op.node_def.attr.values():
        names = [attr.func.name] if attr.HasField("func") else [f.name for f in attr.list.func]
        for name in names:
            function = op.graph._get_function(name)  # pylint: disable=protected-access
            graph = getattr(function, "graph", None)
            if graph is not None:
                yield graph


def _graphs(graph):
    """`graph` and every function graph it calls, directly or not, each once."""
    seen, pending = set(), [graph]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for op in current.get_operations():
            pending.extend(_called_graphs(op))


def device_transfers(graph) -> dict[int, int]:
    """Bytes that cross from one device to another in `graph` (and the functions it calls), by source device index.

    This is what `tf.distribute.ReductionToOneDevice` moves instead of collectives: each replica's tensor is an input
    of an `add_n` (or a concat, for a gather) on the reduce device, and the result an input of an identity on every
    replica's device. Such an edge becomes a send/receive pair when the graph is partitioned; between host devices of
    one process it passes the buffer by reference. Counted once per edge (static shapes only; others are skipped).
    """
    sent: dict[int, int] = {}
    for current in _graphs(graph):
        for op in current.get_operations():
            target = _device_key(op.device)
            for tensor in op.inputs:
                source = _device_key(tensor.op.device)
                if target is None or source is None or source == target or not tensor.shape.is_fully_defined():
                    continue
                if tensor.dtype == tf.resource or tensor.dtype == tf.variant:
                    continue
                size = tensor.shape.num_elements() * tensor.dtype.size
                sent[source[1]] = sent.get(source[1], 0) + size
    return dict(sorted(sent.items()))


def _device_key(device: str):
    """("CPU", 1) for "/job:localhost/replica:0/task:0/device:CPU:1" and "/device:CPU:1"; None when unplaced."""
    match = re.search(r"device:([A-Z]+):(\d+)", device or "")
    return (match.group(1), int(match.group(2))) if match else None


def collective_ops(graph) -> list[CollectiveOp]:
    """Every collective op in `graph` and the functions it calls (each function once), in graph order.

    Raises ValueError if a collective's input shape is not static (its bytes could not be counted).
    """
    found = []
    for current in _graphs(graph):
        for op in current.get_operations():
            if op.type not in KINDS:
                continue
            shape = _input_shape(op)
            if not shape.is_fully_defined():
                raise ValueError(f"collective op {op.name} has a dynamic input shape {shape}; trace the step with "
                                 "static shapes (a dataset with drop_remainder=True) to count its bytes.")
            found.append((op, tuple(shape.as_list())))
    devices = sorted({op.device for op, _ in found}, key=_device_order)
    return [CollectiveOp(op.name, op.type, KINDS[op.type], shape, op.inputs[0].dtype.name, _group_size(op), op.device,
                         devices.index(op.device) if op.device else None) for op, shape in found]


def _input_shape(op) -> tf.TensorShape:
    """The static shape of a collective's input. tf.distribute's all_gather pads each replica's tensor to the largest
    share (a Pad by a runtime amount, so the graph has no static shape): that padding is taken as zero, which it is
    when every replica has the same share (as `check_global_batch` makes it for the batch)."""
    tensor = op.inputs[0]
    if not tensor.shape.is_fully_defined() and tensor.op.type in ("Pad", "PadV2"):
        return tensor.op.inputs[0].shape
    return tensor.shape


def _device_order(device: str):
    match = re.search(r"device:([A-Z]+):(\d+)", device or "")
    return (match.group(1), int(match.group(2))) if match else ("", -1)


def bytes_sent_per_replica(ops: list[CollectiveOp], replica: int = 0) -> float:
    """Bytes `replica` sends over a step whose collectives are `ops` (ring algorithms; see the module docstring)."""
    return sum(op.bytes_sent() for op in ops if op.replica == replica)


def summary(ops: list[CollectiveOp], replica: int = 0) -> dict:
    """Per kind: number of ops, input bytes and bytes sent by `replica`; plus the total sent."""
    kinds: dict = {}
    for op in ops:
        if op.replica != replica:
            continue
        entry = kinds.setdefault(op.kind, {"ops": 0, "input_bytes": 0, "bytes_sent": 0.0, "largest": ()})
        entry["ops"] += 1
        entry["input_bytes"] += op.input_bytes
        entry["bytes_sent"] += op.bytes_sent()
        if op.elements > (0 if not entry["largest"] else int(tf.TensorShape(entry["largest"]).num_elements())):
            entry["largest"] = op.shape
    return {"by_kind": kinds, "bytes_sent": bytes_sent_per_replica(ops, replica)}
