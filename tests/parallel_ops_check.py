"""Checks paddlellm/cpu_parallel.py's model-parallel ops on two CPU processes against one-process maths.

    python -m paddle.distributed.launch --nproc_per_node 2 tests/parallel_ops_check.py

Run by tests/test_parallel.py. Each rank computes, with the patched ops, forward values and gradients of a
small expression and compares them with the same expression on the whole (unsplit) tensors; any mismatch
raises. Rank 0 prints one line per op checked.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402
from paddle.distributed import fleet  # noqa: E402
from paddle.distributed.fleet.layers.mpu import mp_ops  # noqa: E402

from paddlellm import cpu_parallel  # noqa: E402

strategy = fleet.DistributedStrategy()
strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": 2, "pp_degree": 1}
fleet.init(is_collective=True, strategy=strategy)
hcg = fleet.get_hybrid_communicate_group()
group, rank = hcg.get_model_parallel_group(), hcg.get_model_parallel_rank()
assert cpu_parallel.install() == list(cpu_parallel.PATCHED) + ["broadcast_input_data"]

rng = np.random.RandomState(0)  # the same numbers on both ranks
X = rng.randn(3, 4, 6).astype("float32")  # full tensor; the last axis splits into two halves of 3
W = rng.randn(3, 4, 6).astype("float32")  # weights of a scalar loss sum(W * out)
half = slice(3 * rank, 3 * rank + 3)


def tensor(a):
    return paddle.to_tensor(a, stop_gradient=False)


def close(got, want, what):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=what)
    if rank == 0:
        print(f"checked {what}", flush=True)


# c_identity: forward identity; the gradient of a per-rank loss is summed over the ranks
x = tensor(X)
y = mp_ops._c_identity(x, group=group)
(y * float(rank + 1)).sum().backward()
close(y.numpy(), X, "c_identity forward")
close(x.grad.numpy(), np.full_like(X, 1.0 + 2.0), "c_identity backward (all-reduce)")

# mp_allreduce: forward sum over ranks (rank r holds X * (r + 1)); backward identity
x = tensor(X * (rank + 1))
y = mp_ops._mp_allreduce(x, group=group)
(y * paddle.to_tensor(W)).sum().backward()
close(y.numpy(), X * 3, "mp_allreduce forward")
close(x.grad.numpy(), W, "mp_allreduce backward (identity)")

# c_concat: rank r holds the r-th half of the last axis; forward gives the whole; backward its half
x = tensor(X[..., half])
y = paddle.distributed.collective._c_concat(x, group=group)
(y * paddle.to_tensor(W)).sum().backward()
close(y.numpy(), X, "c_concat forward")
close(x.grad.numpy(), W[..., half], "c_concat backward (own slice)")

# c_split: forward own half; backward gathers the halves' gradients
x = tensor(X)
y = mp_ops._c_split(x, group=group)
(y * paddle.to_tensor(W[..., half])).sum().backward()
close(y.numpy(), X[..., half], "c_split forward")
close(x.grad.numpy(), W, "c_split backward (all-gather)")  # each rank's half of the gradient, gathered

# vocabulary-parallel cross-entropy: logits [3, 4, 6] split over the vocabulary, labels global, one ignored
labels = rng.randint(0, 6, size=(3, 4)).astype("int64")
labels[0, 1] = -100
full = tensor(X)
want = F.cross_entropy(full, paddle.to_tensor(labels).unsqueeze(-1), ignore_index=-100, reduction="none")
(want * paddle.to_tensor(W[..., :1])).sum().backward()
part = tensor(X[..., half])
loss, softmax = mp_ops._c_softmax_with_cross_entropy(part, paddle.to_tensor(labels), group=group, return_softmax=True)
(loss * paddle.to_tensor(W[..., :1])).sum().backward()
close(loss.numpy(), want.numpy(), "c_softmax_with_cross_entropy loss (ignore_index gives 0)")
close(softmax.numpy(), F.softmax(paddle.to_tensor(X), axis=-1).numpy()[..., half], "c_softmax_with_cross_entropy softmax")
close(part.grad.numpy(), full.grad.numpy()[..., half], "c_softmax_with_cross_entropy gradient")

# the TensorParallel input broadcast: rank 1's batch is replaced by rank 0's
ids = paddle.to_tensor(np.full([2, 3], 7 + rank, dtype="int64"))
mask = paddle.to_tensor(np.array([[True, rank == 0, True]]))
args, kwargs = cpu_parallel.broadcast_input_data(hcg, ids, attention_mask=mask, note=f"rank{rank}")
close(args[0].numpy(), np.full([2, 3], 7), "broadcast_input_data tensors")
assert kwargs["attention_mask"].dtype == paddle.bool and kwargs["attention_mask"].numpy().tolist() == [[True, True, True]]
assert kwargs["note"] == "rank0"
if rank == 0:
    print("checked broadcast_input_data bool masks and objects", flush=True)
    print("ALL OPS CHECKED", flush=True)
