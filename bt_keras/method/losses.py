"""The Barlow Twins redundancy-reduction loss, exact over the global batch.

Barlow Twins (Zbontar et al., ICML 2021, eq. 1) normalises each view's embedding along the batch, forms the
cross-correlation matrix ``C = z1n^T z2n / N`` (D x D) and asks it to be the identity:

    loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2

`reference_loss`, first below, is that formula in a dozen lines; `barlow_twins_loss` is the fast form training uses
(same values and gradient, held equal by the tests), with the reference behind the `BT_KERAS_FAST=0` switch
(`bt_keras.fast_paths`).

Everything here is over the GLOBAL batch. Called inside a `tf.distribute` replica context with more than one
replica, the batch statistics are summed across replicas with `all_reduce`, which is differentiable, and so are
either C (D x D) or, when the global batch is below D, the gathered embeddings' Gram sums (`bt_keras.method.loss_forms`
chooses by bytes sent and FLOPs), so every replica computes the same, exact global loss. (The official PyTorch code
all-reduces C without a gradient instead; see `BarlowTwins.train_step` for how we turn per-replica gradients into the
true gradient of the global loss.)

The batch normalisation is BatchNorm without scale and offset in training mode, as in the official code: biased
variance, epsilon 1e-5 (torch's default). All arithmetic is float32 under a mixed-precision policy (float16/bfloat16 embeddings are cast up); float64
embeddings stay float64, which the exactness tests use to separate maths from float32 round-off.
"""

from __future__ import annotations

import tensorflow as tf

from bt_keras import fast_paths
from bt_keras.distribute import global_sum
from bt_keras.method import loss_forms

EPSILON = 1e-5  # torch.nn.BatchNorm1d's default, used by the official code's affine-free BN.
DEFAULT_LAMBDA = 0.0051  # official code's default (the paper's text says 5e-3).


def reference_loss(z1, z2, lambd: float = DEFAULT_LAMBDA) -> dict[str, tf.Tensor]:
    """The method, plainly: the paper's eq. 1 over the global batch, differentiated by autodiff.

    `barlow_twins_loss` (below) computes the same values and gradients with fewer passes over the D x D matrix;
    tests/method/test_losses.py holds it to this function, and `BT_KERAS_FAST=0` makes training use this one.
    """
    z1, z2 = _check_embeddings(z1, z2)
    n = global_sum(tf.cast(tf.shape(z1)[0], z1.dtype))  # the GLOBAL batch size

    def batch_norm(z):  # BatchNorm without scale/offset, training mode, statistics over the global batch
        mean = global_sum(tf.reduce_sum(z, axis=0)) / n
        variance = global_sum(tf.reduce_sum(tf.square(z - mean), axis=0)) / n
        return (z - mean) / tf.sqrt(variance + EPSILON)

    c = global_sum(tf.matmul(batch_norm(z1), batch_norm(z2), transpose_a=True)) / n  # D x D cross-correlation
    diagonal = tf.linalg.diag_part(c)
    on_diagonal = tf.reduce_sum(tf.square(1.0 - diagonal))  # invariance
    off_diagonal = tf.reduce_sum(tf.square(c)) - tf.reduce_sum(tf.square(diagonal))  # redundancy reduction
    return {"loss": on_diagonal + lambd * off_diagonal, "on_diagonal": on_diagonal, "off_diagonal": off_diagonal,
            "cross_correlation": tf.stop_gradient(c)}


def _replicas_in_sync() -> int:
    context = tf.distribute.get_replica_context()
    return context.num_replicas_in_sync if context is not None else 1


def _check_embeddings(z1, z2) -> tuple[tf.Tensor, tf.Tensor]:
    z1 = tf.convert_to_tensor(z1)
    z2 = tf.convert_to_tensor(z2)
    for name, z in (("z1", z1), ("z2", z2)):
        if not z.dtype.is_floating:
            raise ValueError(
                f"Barlow Twins loss: {name} has dtype {z.dtype.name}; embeddings must be floating point. "
                "Cast the inputs (e.g. images to float32) before the encoder."
            )
        if z.shape.rank != 2:
            raise ValueError(f"Barlow Twins loss: {name} must be a [batch, dim] matrix, got shape {z.shape}.")
    if not z1.shape.is_compatible_with(z2.shape):
        raise ValueError(
            f"Barlow Twins loss: the two views' embeddings differ in shape, z1 {z1.shape} vs z2 {z2.shape}. "
            "Both views must go through the same encoder and projector with the same batch size."
        )
    local_batch = z1.shape[0]
    if local_batch is not None and local_batch * _replicas_in_sync() < 2:
        raise ValueError(
            "Barlow Twins loss: the global batch has 1 example; batch statistics (mean, variance) need at least "
            "2, and the method is meant for large batches (the paper uses 2048). Increase the batch size."
        )
    dtype = tf.float64 if z1.dtype == tf.float64 else tf.float32
    return tf.cast(z1, dtype), tf.cast(z2, dtype)


def _global_moments(z: tf.Tensor, count: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`z` minus its mean along the GLOBAL batch of `count` rows, and its biased variance there (two all-reduces of D
    numbers under replicas): the one global-batch normalisation of the fast paths and of `embedding_std`."""
    centred = z - global_sum(tf.reduce_sum(z, axis=0)) / count
    return centred, global_sum(tf.reduce_sum(tf.square(centred), axis=0)) / count


def _batch_normalize(z: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    """Normalises `z` along the (global) batch: zero mean, unit biased variance, as BatchNorm in training mode."""
    centred, variance = _global_moments(z, count)
    return centred * tf.math.rsqrt(variance + EPSILON)


def _normalized_views(z1, z2) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Checked embeddings, each normalised along the global batch, and the global batch size N."""
    z1, z2 = _check_embeddings(z1, z2)
    count = global_sum(tf.cast(tf.shape(z1)[0], z1.dtype))
    return _batch_normalize(z1, count), _batch_normalize(z2, count), count


def _correlation_of_normalized(z1n_over_n, z2n) -> tf.Tensor:
    """C = (z1n / N)^T z2n summed over replicas; 1/N is folded into the B x D factor, not the D x D product."""
    return global_sum(tf.matmul(z1n_over_n, z2n, transpose_a=True))


def cross_correlation(z1, z2) -> tf.Tensor:
    """The D x D cross-correlation matrix of two views' embeddings over the global batch.

    Args:
      z1, z2: `[batch, D]` embeddings of the two views (this replica's share of the batch inside a replica context).

    Returns:
      `C` with `C[i, j] = sum_b z1n[b, i] * z2n[b, j] / N`, where `zkn` is `zk` normalised along the global batch
      and N the global batch size. Identical on every replica.

    Example:
      >>> z = tf.random.normal([64, 8])
      >>> c = cross_correlation(z, z)  # diagonal ~1: a view correlates perfectly with itself.
    """
    z1n, z2n, count = _normalized_views(z1, z2)
    return _correlation_of_normalized(z1n / count, z2n)


def _all_gather(*tensors: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """Every replica's `tensors` stacked along the batch (replica order); identity on one replica.

    Used only inside `_correlation_terms`' forward pass, whose hand-written gradient needs no collective, so the
    all-gather's own gradient (an all-reduce of the whole B x D gradient, then a slice) never runs.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensors
    gathered = context.all_gather(list(tensors), axis=0)
    for local, result in zip(tensors, gathered):  # equal shares (check_global_batch): the result's shape is static
        if local.shape[0] is not None:
            result.set_shape([local.shape[0] * context.num_replicas_in_sync] + local.shape[1:].as_list())
    return tuple(gathered)


def _correlation_terms(z1n, z2n, count, lambd: float) -> tuple:
    """(loss, on_diagonal, off_diagonal, C as a function) from batch-normalised embeddings, with a hand-written gradient.

    With D x D matrices of 8192^2 floats (256 MiB), the loss is memory-bound unless every pass over C counts. Autodiff
    of the plain formula writes C, C^2, the broadcast upstream, 2 C, a diagonal matrix and their sum (six D x D
    tensors) and reads them back. Here the forward pass writes C once and reads it once (sum of squares), and the
    backward pass reads it twice (the two matmuls), using dL/dC = 2 lambd C + diag(-2 (1 - C_ii) - 2 lambd C_ii):

        dL/dz1n = (2 lambd z2n C^T + z2n * g) / N,   dL/dz2n = (2 lambd z1n C + z1n * g) / N,   g_i the diagonal part.

    The Gram form (`loss_forms` chooses it by cost: B <= D on one replica, B < D on several) never forms C:
    everything goes through the B x B Gram matrices Ga = (z1n/N)(z1n/N)^T and Gb = z2n z2n^T (same maths, B^2 D
    instead of B D^2 multiply-adds, and no 256 MiB tensor in the step's peak):

        sum_ij C_ij^2 = sum(Ga * Gb),   C_ii = sum_b z1n[b, i] z2n[b, i] / N,   z2n C^T = Gb z1n / N,   z1n C / N = Ga z2n.

    Under R replicas the Gram form all-gathers z1n/N and z2n (B x D each), each replica forms its own rows of Ga and
    Gb (B/R x B), and the diagonal and sum(Ga * Gb) are summed across replicas as one vector of D + 1 numbers. Its
    backward pass needs its rows only: replica r's rows of the two products above, Gb[r] (z1n/N) and Ga[r] z2n.

    The replica convention (see `BarlowTwins`): every replica computes the same L and differentiates L / R. A sum
    across replicas, differentiated, gives each replica the sum of the R upstream gradients, i.e. R times its own:
    so both forms' gradients are multiplied by R here, where the collectives are not differentiated. That makes
    each replica's gradient the true dL/d(its embeddings), and the optimizer's sum over replicas exact.

    C carries no gradient (it is for pictures and diagnostics; `cross_correlation` is differentiable). In the Gram
    form it is only computed when the returned function is called (under several replicas that is a D x D all-reduce).
    """
    replicas = _replicas_in_sync()
    local_batch, dim = z1n.shape[0], z1n.shape[1]
    batch = None if local_batch is None else local_batch * replicas
    use_gram = loss_forms.choose(batch, dim, replicas, itemsize=z1n.dtype.size) == "gram"
    if use_gram and local_batch is None:
        raise ValueError("Barlow Twins loss: the Gram form (forced with loss_forms.set_form) needs a static batch "
                         "size; use loss_forms.set_form(None) or a dataset with drop_remainder=True.")

    @tf.custom_gradient
    def terms(a, b):
        a_over_n = a / count
        if use_gram:
            a_all, b_all = _all_gather(a_over_n, b)  # B x D each; this replica's own rows are a_over_n, b
            gram_a = tf.matmul(a_over_n, a_all, transpose_b=True)  # this replica's rows of Ga
            gram_b = tf.matmul(b, b_all, transpose_b=True)
            local_sums = tf.concat([tf.reduce_sum(a_over_n * b, axis=0), [tf.reduce_sum(gram_a * gram_b)]], axis=0)
            sums = global_sum(local_sums)  # one all-reduce of D + 1 numbers
            diagonal, sum_of_squares = sums[:-1], sums[-1]
        else:
            c = _correlation_of_normalized(a_over_n, b)
            diagonal = tf.linalg.diag_part(c)
            sum_of_squares = 2.0 * tf.nn.l2_loss(c)  # reads C once instead of writing C^2 and reading it back
        on_diagonal = tf.reduce_sum(tf.square(1.0 - diagonal))
        off_diagonal = sum_of_squares - tf.reduce_sum(tf.square(diagonal))
        loss = on_diagonal + lambd * off_diagonal

        def grad(d_loss, d_on, d_off, *_d_c):  # C (non-Gram form) is returned for pictures only: no gradient
            zero = tf.zeros([], diagonal.dtype)
            d_loss = zero if d_loss is None else tf.cast(d_loss, diagonal.dtype)
            d_on = zero if d_on is None else tf.cast(d_on, diagonal.dtype)
            d_off = zero if d_off is None else tf.cast(d_off, diagonal.dtype)
            coefficient = 2.0 * (lambd * d_loss + d_off)  # dL/dC = coefficient * C + diag(g)
            g = -2.0 * (1.0 - diagonal) * (d_loss + d_on) - coefficient * diagonal
            if replicas > 1:  # the un-differentiated collectives' backward pass: see the docstring
                coefficient = coefficient * replicas
                g = g * replicas
            if use_gram:
                d_a = (coefficient * tf.matmul(gram_b, a_all) + b * g) / count
                d_b = coefficient * tf.matmul(gram_a, b_all) + a_over_n * g
                return d_a, d_b
            d_a = (coefficient * tf.matmul(b, c, transpose_b=True) + b * g) / count
            d_b = coefficient * tf.matmul(a_over_n, c) + a_over_n * g
            return d_a, d_b

        return (loss, on_diagonal, off_diagonal) + (() if use_gram else (c,)), grad

    outputs = terms(z1n, z2n)
    if use_gram:
        correlation = lambda: tf.stop_gradient(_correlation_of_normalized(z1n / count, z2n))  # noqa: E731
    else:
        c = tf.stop_gradient(outputs[3])
        correlation = lambda: c  # noqa: E731
    return outputs[0], outputs[1], outputs[2], correlation


class LossTerms(dict):
    """The loss's terms (a dict); `terms["cross_correlation"]` computes C on first use when it was not needed.

    In the Gram form C is never part of the loss, and under several replicas computing it means a D x D all-reduce
    (256 MiB at D = 8192) that a graph would not prune (collectives are stateful): so it is built only if read, in
    the same context as the loss (the same replica function or traced step).
    """

    def __init__(self, values=(), correlation=None):
        super().__init__(values)  # tf.nest rebuilds dict subclasses from their items alone: correlation is optional
        self._correlation = correlation

    def __missing__(self, key):
        if key != "cross_correlation" or self._correlation is None:
            raise KeyError(key)
        self[key] = value = self._correlation()
        return value


def barlow_twins_loss(z1, z2, lambd: float = DEFAULT_LAMBDA) -> dict[str, tf.Tensor]:
    """The Barlow Twins loss of two views' embeddings, over the global batch.

    Args:
      z1, z2: `[batch, D]` projector outputs of the two views.
      lambd: weight of the redundancy-reduction (off-diagonal) term; 0.0051 in the official code.

    Returns:
      A dict of float32 scalars: `loss` = `on_diagonal` + lambd * `off_diagonal`, where `on_diagonal` =
      sum_i (1 - C_ii)^2 (invariance) and `off_diagonal` = sum_{i != j} C_ij^2 (redundancy, unweighted);
      and `cross_correlation`, the matrix C itself, for pictures and diagnostics (without gradient; use
      `cross_correlation` to differentiate C; computed when first read, see `LossTerms`). `loss` carries the exact
      gradient of the formula, computed with few passes over the D x D matrix or without it (see
      `_correlation_terms`); the gradient of `on_diagonal`/`off_diagonal` is exact too.
    """
    if not fast_paths.enabled():
        return reference_loss(z1, z2, float(lambd))
    z1n, z2n, count = _normalized_views(z1, z2)
    loss, on_diagonal, off_diagonal, correlation = _correlation_terms(z1n, z2n, count, float(lambd))
    return LossTerms({"loss": loss, "on_diagonal": on_diagonal, "off_diagonal": off_diagonal}, correlation)


def embedding_std(z) -> tf.Tensor:
    """Mean per-dimension standard deviation, over the global batch, of the L2-normalised embeddings `z`.

    The collapse signal of Chen & He (SimSiam, 2021): 0 when every example maps to the same point, about
    1/sqrt(D) when the embeddings spread over the unit sphere. Logged by `BarlowTwins` as `embedding_std`.
    """
    z = tf.math.l2_normalize(tf.cast(z, tf.float32), axis=1)
    _, variance = _global_moments(z, global_sum(tf.cast(tf.shape(z)[0], tf.float32)))
    return tf.reduce_mean(tf.sqrt(variance))
