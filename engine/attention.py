"""Attention over two CPU cores for long prefill chunks.

Owns: the attention call of models on the CPU, where MLX runs each
elementwise op on one core and the softmax's exponentials of a prefill
chunk read deep into the context dominate (measured on 2 cores: 256 new
tokens against 8,192 cached, 266 of the 360 ms of one layer's attention are
the exponentials). A long chunk's queries are split in two halves, each
attended on its own CPU stream (MLX runs each stream on its own thread), and
joined: 1.5x faster attention at depth, the same numbers (bench/RESULTS.md).

Never: changes what is computed. Calls it cannot split (short chunks,
quantized KV caches, attention sinks) go to the model's own attention.
"""

import os
import sys
import threading

# Below this many attention scores (heads x queries x keys) a call is not
# worth splitting: a decode step's are ~0.1M, a 512-token chunk's at 12k
# deep ~60M.
SPLIT_MIN_SCORES = 1 << 22


def cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def use_split_attention(model):
    """Route ``model``'s attention through ``split_attention`` when it runs
    on a CPU with two cores or more; returns whether it does. The model's
    module (mlx-lm's, e.g. mlx_lm.models.llama) looks its attention function
    up at call time, so the module's name is what is rebound."""
    import mlx.core as mx

    module = sys.modules.get(type(model).__module__)
    own = getattr(module, "scaled_dot_product_attention", None)
    if mx.default_device() != mx.cpu or cores() < 2 or own is None:
        return False
    if getattr(own, "splits", None) is None:
        module.scaled_dot_product_attention = _splitting(own)
    return True


def _splitting(own):
    import mlx.core as mx

    # The second CPU stream, made at first use on each thread that calls:
    # MLX streams belong to the thread that made them (one engine thread per
    # engine, and a process may run several).
    local = threading.local()

    def attention(queries, keys, values, cache, scale, mask, sinks=None):
        _, heads, n, _ = queries.shape
        if (sinks is not None or hasattr(cache, "bits") or n < 2
                or heads * n * keys.shape[2] < SPLIT_MIN_SCORES):
            return own(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        if getattr(local, "side", None) is None:
            local.side = mx.new_stream(mx.cpu)
        return split_attention(queries, keys, values, scale, mask, local.side)

    attention.splits = own
    return attention


def split_attention(queries, keys, values, scale, mask, stream):
    """``mx.fast.scaled_dot_product_attention`` with the first half of the
    queries on the default stream and the second half on ``stream``. A
    "causal" mask aligns the queries with the last keys, so the first half
    attends to the keys up to its own last position."""
    import mlx.core as mx

    attend = mx.fast.scaled_dot_product_attention
    n = queries.shape[2]
    first, second = n // 2, n - n // 2
    q1, q2 = queries[:, :, :first], queries[:, :, first:]
    if isinstance(mask, str):  # "causal"
        upto = keys.shape[2] - second
        out1 = attend(q1, keys[:, :, :upto], values[:, :, :upto], scale=scale, mask=mask)
        out2 = attend(q2, keys, values, scale=scale, mask=mask, stream=stream)
    else:
        m1 = m2 = mask
        if mask is not None and mask.ndim >= 2 and mask.shape[-2] == n:
            m1, m2 = mask[..., :first, :], mask[..., first:, :]
        out1 = attend(q1, keys, values, scale=scale, mask=m1)
        out2 = attend(q2, keys, values, scale=scale, mask=m2, stream=stream)
    return mx.concatenate([out1, out2], axis=2)
