"""Which of two exact forms computes the Barlow Twins loss, chosen by what each costs per replica.

The loss needs two sums over the global batch of B examples (D-dimensional, normalised, a = z1n / N, b = z2n): the
diagonal C_ii = sum_n a_ni b_ni and the sum of squares sum_ij C_ij^2. Two forms give them exactly:

* ``"correlation"``: every replica forms its share of C = a^T b (D x D) and all-reduces it; the backward pass
  multiplies by C. FLOPs per replica (forward + backward): 3 x 2 x (B/R) x D^2.
* ``"gram"``: the replicas all-gather a and b (B x D each), each forms its rows of the B x B Gram matrices
  Ga = a a^T and Gb = b b^T, and sum_ij C_ij^2 = sum(Ga * Gb) and the diagonal are all-reduced as one vector of D + 1
  numbers; the backward pass multiplies by the Gram rows and needs no collective. FLOPs per replica:
  4 x 2 x (B/R) x B x D. On one replica it is the same form with nothing to gather.

Bytes a replica sends, for ring algorithms (what collective implementations use for large tensors): an all-reduce of
n bytes sends 2 (R-1)/R n, an all-gather with an n-byte result sends (R-1)/R n. So the Gram form sends
B/D of what the correlation form sends (the D x D all-reduce), and does 4B/(3D) of its FLOPs.

The rule (`choose`): the Gram form when it sends no more bytes than the correlation form AND does at most
`FLOP_SLACK` (4/3) times its FLOPs; else the correlation form. In closed form: B <= D on one replica (no bytes either
way) and B * D + D + 1 + (the shape exchange, 2R int32) <= D^2, i.e. B < D, on several. The slack admits 3D/4 < B <= D, where the Gram form does up to
a third more of the loss's FLOPs (a few percent of a training step: 2.4% at `imagenet_small`'s B = 32, D = 8192) but
never holds a larger matrix than C and sends fewer bytes. The choice is logged once per shape (absl logging, INFO).

`set_form("gram" | "correlation")` overrides the rule (benchmarks and tests compare the forms); `BT_KERAS_FAST=0`
(`bt_keras.fast_paths`) bypasses both forms for the plain formula (`losses.reference_loss`).
"""

from __future__ import annotations

import dataclasses
import threading

from absl import logging

FORMS = ("gram", "correlation")
FLOP_SLACK = 4.0 / 3.0

_override: str | None = None
_logged: set = set()
_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op of a loss form: its kind ("all_reduce" / "all_gather"), what it moves and its purpose."""

    kind: str
    elements: int  # all_reduce: the reduced tensor's size; all_gather: the gathered (output) tensor's size
    purpose: str
    itemsize: int | None = None  # bytes per element when not the embeddings' (int32 shapes)

    def bytes_sent(self, replicas: int, itemsize: int) -> float:
        """Bytes one replica sends for this collective under a ring algorithm (0 on one replica)."""
        share = (replicas - 1) / replicas
        size = self.itemsize or itemsize
        return (2 * share if self.kind == "all_reduce" else share) * self.elements * size


@dataclasses.dataclass(frozen=True)
class FormCost:
    """What one form of the loss costs per replica per step."""

    form: str
    collectives: tuple[Collective, ...]
    flops: float  # multiply-adds x 2 of the loss's matrix products, forward + backward, on one replica
    bytes_sent: float  # per replica, ring algorithms (see `Collective.bytes_sent`)

    def describe(self) -> str:
        return f"{self.form}: {self.bytes_sent / 2**20:.2f} MiB sent/replica, {self.flops / 1e9:.3f} GFLOP/replica"


def _statistics_collectives(dim: int) -> tuple[Collective, ...]:
    """The collectives both forms share: the global batch size and each view's mean and variance (losses.py), and
    the backward pass of the last two (the gradient of an all-reduce is an all-reduce)."""
    per_view = tuple(Collective("all_reduce", dim, f"view {statistic} ({direction})")
                     for statistic in ("mean", "variance") for direction in ("forward", "backward"))
    return (Collective("all_reduce", 1, "batch size"),) + per_view + per_view


def costs(batch: int, dim: int, replicas: int, itemsize: int = 4) -> dict[str, FormCost]:
    """Per-replica cost of each form at global batch `batch`, embedding width `dim`, `replicas` replicas.

    Example:
      >>> c = costs(2048, 8192, 16)  # the paper's setting on 16 replicas
      >>> round(c["gram"].bytes_sent / c["correlation"].bytes_sent, 3)
      0.25
    """
    for name, value in (("batch", batch), ("dim", dim), ("replicas", replicas), ("itemsize", itemsize)):
        if int(value) < 1:
            raise ValueError(f"loss_forms.costs: {name} must be a positive integer, got {value!r}.")
    local = batch / replicas
    shared = _statistics_collectives(dim) if replicas > 1 else ()
    if replicas > 1:
        # tf.distribute's all_gather first exchanges each replica's shape (int32 [1, 2]: it allows uneven shares).
        shapes = tuple(Collective("all_gather", 2 * replicas, f"view {v} shape", itemsize=4) for v in (1, 2))
        gram_collectives = shared + shapes + (
            Collective("all_gather", batch * dim, "view 1 embeddings a = z1n / N"),
            Collective("all_gather", batch * dim, "view 2 embeddings b = z2n"),
            Collective("all_reduce", dim + 1, "diagonal of C and sum of squares"),
        )
        correlation_collectives = shared + (Collective("all_reduce", dim * dim, "C"),)
    else:
        gram_collectives = correlation_collectives = ()
    result = {}
    for form, collectives, flops in (
        ("gram", gram_collectives, 4 * 2 * local * batch * dim),
        ("correlation", correlation_collectives, 3 * 2 * local * dim * dim),
    ):
        sent = sum(c.bytes_sent(replicas, itemsize) for c in collectives)
        result[form] = FormCost(form, collectives, float(flops), float(sent))
    return result


def set_form(form: str | None) -> None:
    """Forces `form` ("gram" or "correlation") for every loss traced from now on; None returns to `choose`'s rule."""
    global _override
    if form is not None and form not in FORMS:
        raise ValueError(f"loss_forms.set_form takes one of {FORMS} or None, got {form!r}.")
    _override = form


def forced() -> str | None:
    """The form forced by `set_form`, or None."""
    return _override


def choose(batch: int | None, dim: int | None, replicas: int, itemsize: int = 4) -> str:
    """The form the loss uses for this shape (see the module docstring), logged once per shape and choice.

    Unknown (dynamic) batch or width: the correlation form, which works for any shape.
    """
    if _override is not None:
        form, why = _override, "forced by loss_forms.set_form"
        cost = None
    elif batch is None or dim is None:
        form, why, cost = "correlation", "the batch or embedding width is not known when the step is traced", None
    else:
        cost = costs(batch, dim, replicas, itemsize)
        gram, correlation = cost["gram"], cost["correlation"]
        fewer_bytes = gram.bytes_sent <= correlation.bytes_sent
        flops_ok = gram.flops <= FLOP_SLACK * correlation.flops
        form = "gram" if fewer_bytes and flops_ok else "correlation"
        why = f"{gram.describe()}; {correlation.describe()}"
    key = (batch, dim, replicas, itemsize, form)
    with _lock:
        first = key not in _logged
        _logged.add(key)
    if first:
        logging.info("bt_keras: Barlow Twins loss in the %s form (global batch %s, D %s, %d replica(s)): %s",
                     form, batch, dim, replicas, why)
    return form
