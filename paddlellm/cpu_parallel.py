"""Paddle's model-parallel ops on the CPU, through the gloo collectives that work there.

Workaround (paddlepaddle 3.3.1 CPU): tensor parallelism (paddle's ColumnParallelLinear, RowParallelLinear,
VocabParallelEmbedding, ParallelCrossEntropy, and paddlenlp's parallel LoRA layers and lm heads) calls a few
model-parallel ops of `paddle.distributed.fleet.layers.mpu.mp_ops` that cannot run on a CPU:

  c_identity, c_concat, c_split, c_softmax_with_cross_entropy
                     no CPU kernel ("Do not support c_identity for cpu kernel now")
  mp_allreduce       all-reduces on the "calc stream", which ProcessGroupGLOO refuses
                     ("does not support all_reduce with sync_op and use_calc_stream flag"); its backward is
                     the c_identity op again
  broadcast_input_data
                     paddle's TensorParallel wrapper broadcasts each batch over the group; it asserts a GPU
  (c_embedding, the vocabulary-parallel lookup, has a CPU kernel and is left alone.)

`install()` replaces those five Python entry points (in `mp_ops` and their re-exports in
`paddle.distributed.collective`, which is where every caller looks them up at call time) by autograd
functions with the same meaning, built from `paddle.distributed.all_reduce` / `all_gather`, which gloo
runs correctly:

  _c_identity        forward: identity        backward: all-reduce (sum) over the model-parallel group
  _mp_allreduce      forward: all-reduce (sum) backward: identity
  _c_concat          forward: all-gather and concatenate along the last axis; backward: this rank's slice
  _c_split           forward: this rank's slice of the last axis; backward: all-gather and concatenate
  _c_softmax_with_cross_entropy
                     cross-entropy of logits whose last (vocabulary) axis is split over the group, labels
                     being global ids: the max, the sum of exponentials and the label's logit are
                     all-reduced, so each rank gets the full loss; its gradient is this rank's slice of
                     softmax - one_hot(label); ignore_index gives loss 0 and no gradient

It is installed only when paddle runs on the CPU and a model-parallel (tensor-parallel) group of more than
one process exists; on GPUs paddle's own kernels run and nothing here is touched.

Pipeline parallel on CPU (`pipeline_config`, `install_pipeline`) needs two more small things: plain
isend/irecv between stages instead of paddle's batched calc-stream p2p, and a device id for PipelineLayer.
`whole_tensor_split_actions` works around a paddlenlp loading bug of tensor-parallel models on any device.
Foundation layer: imports only paddle.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Dict, List, Optional

log = logging.getLogger("paddlellm")

PATCHED = ("_c_identity", "_mp_allreduce", "_c_concat", "_c_split", "_c_softmax_with_cross_entropy")
_installed: List[str] = []


def _group(group):
    from paddle.distributed import collective

    return collective._get_default_group() if group is None else group


def _all_reduce(t, group, op=None):
    import paddle.distributed as dist

    dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM, group=group)  # in place, synchronous
    return t


def _all_gather_last(t, group):
    """Tensors of every rank of the group, concatenated along the last axis (rank order)."""
    import paddle
    import paddle.distributed as dist

    parts: list = []
    dist.all_gather(parts, t.contiguous() if hasattr(t, "contiguous") else t, group=group)
    return paddle.concat(parts, axis=-1)


def _own_slice_last(t, group):
    import paddle

    return paddle.split(t, group.nranks, axis=-1)[group.rank].clone()


def _layers():
    """The autograd functions, built on first use (paddle is imported only then)."""
    from paddle.autograd import PyLayer

    class Identity(PyLayer):  # forward identity, backward all-reduce
        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return x.clone()  # a PyLayer may not hand back its (leaf) input itself

        @staticmethod
        def backward(ctx, dy):
            return _all_reduce(dy.clone(), ctx.group)

    class AllReduce(PyLayer):  # forward all-reduce, backward identity
        @staticmethod
        def forward(ctx, x, group):
            return _all_reduce(x.clone(), group)

        @staticmethod
        def backward(ctx, dy):
            return dy

    class Concat(PyLayer):  # forward all-gather along the last axis, backward own slice
        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return _all_gather_last(x, group)

        @staticmethod
        def backward(ctx, dy):
            return _own_slice_last(dy, ctx.group)

    class Split(PyLayer):  # forward own slice of the last axis, backward all-gather
        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return _own_slice_last(x, group)

        @staticmethod
        def backward(ctx, dy):
            return _all_gather_last(dy, ctx.group)

    class VocabParallelCrossEntropy(PyLayer):
        @staticmethod
        def forward(ctx, logits, label, group, ignore_index):
            import paddle
            import paddle.distributed as dist

            part = logits.shape[-1]
            start = group.rank * part
            x = logits.astype("float32")
            top = _all_reduce(x.max(axis=-1, keepdim=True), group, dist.ReduceOp.MAX)
            shifted = x - top
            exp = paddle.exp(shifted)
            total = _all_reduce(exp.sum(axis=-1, keepdim=True), group)
            kept = label != ignore_index
            local = label - start
            here = kept & (local >= 0) & (local < part)  # the label's logit lives on this rank
            index = paddle.where(here, local, paddle.zeros_like(local))
            picked = paddle.take_along_axis(shifted, index, axis=-1) * here.astype("float32")
            picked = _all_reduce(picked, group)
            loss = (paddle.log(total) - picked) * kept.astype("float32")
            softmax = exp / total
            ctx.save_for_backward(softmax, index, here, kept)
            ctx.dtype = logits.dtype
            return loss.astype(logits.dtype), softmax.astype(logits.dtype)

        @staticmethod
        def backward(ctx, dloss, dsoftmax=None):
            import paddle
            import paddle.nn.functional as F

            softmax, index, here, kept = ctx.saved_tensor()
            onehot = F.one_hot(index.squeeze(-1), softmax.shape[-1]) * here.astype("float32")
            grad = (softmax - onehot) * (dloss.astype("float32") * kept.astype("float32"))
            return grad.astype(ctx.dtype), None

    return Identity, AllReduce, Concat, Split, VocabParallelCrossEntropy


_cache = {}


def _fn(name):
    if not _cache:
        _cache.update(zip(("identity", "allreduce", "concat", "split", "xent"), _layers()))
    return _cache[name]


# ------------------------------------------------------------------ the replacements (mp_ops' signatures)
def c_identity(tensor, group=None, skip_c_identity_dynamic=False):
    if group is not None and not group.is_member():
        return None
    if skip_c_identity_dynamic:  # paddle's mp_skip_c_identity: the caller all-reduces the gradient itself
        return tensor
    return _fn("identity").apply(tensor, _group(group))


def mp_allreduce(tensor, op=None, group=None, use_calc_stream=True, use_model_parallel=True, skip_c_identity_dynamic=False):
    if group is not None and not group.is_member():
        return None
    from paddle.distributed import ReduceOp

    if op is not None and op != ReduceOp.SUM:
        raise NotImplementedError(f"_mp_allreduce on CPU: only ReduceOp.SUM (got {op})")
    return _fn("allreduce").apply(tensor, _group(group))


def c_concat(tensor, group=None):
    if group is not None and not group.is_member():
        return None
    return _fn("concat").apply(tensor, _group(group))


def c_split(tensor, group=None):
    if group is not None and not group.is_member():
        return None
    return _fn("split").apply(tensor, _group(group))


def c_softmax_with_cross_entropy(logits, label, group=None, return_softmax=False, ignore_index=-100):
    if group is not None and not group.is_member():
        return None
    import paddle

    if len(label.shape) == len(logits.shape) - 1:
        label = paddle.unsqueeze(label, axis=-1)
    loss, softmax = _fn("xent").apply(logits, label.astype("int64"), _group(group), ignore_index)
    return (loss, softmax) if return_softmax else loss


def broadcast_input_data(hcg, *inputs, **kwargs):
    """paddle's TensorParallel wrapper sends every batch from the group's first rank to the others before each
    forward; its version asserts a GPU/XPU device. Same here with gloo's broadcast (bool tensors go as int32,
    which gloo can send)."""
    import paddle
    import paddle.distributed as dist

    group, src = hcg.get_model_parallel_group(), hcg.get_model_parallel_group_src_rank()

    def send(x):
        if isinstance(x, paddle.Tensor):
            with paddle.no_grad():
                t = x.astype("int32") if x.dtype == paddle.bool else x.contiguous()
                dist.broadcast(t, src=src, group=group)
                return t.astype("bool") if x.dtype == paddle.bool else t
        if isinstance(x, dict):
            return {k: send(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(send(v) for v in x)
        box = [x]
        dist.broadcast_object_list(box, src=src, group=group)
        return box[0]

    return send(inputs), send(kwargs)


REPLACEMENTS = {"_c_identity": c_identity, "_mp_allreduce": mp_allreduce, "_c_concat": c_concat,
                "_c_split": c_split, "_c_softmax_with_cross_entropy": c_softmax_with_cross_entropy}


@contextlib.contextmanager
def whole_tensor_split_actions(model_class, tied: Optional[Dict[str, str]] = None):
    """While a tensor-parallel model loads, its split actions get whole arrays (any device, not only CPU).

    Workaround (paddlenlp 3.0.0b4): loading model.safetensors into a tensor-parallel model hands each split
    action a lazy safetensors slice. The plain row/column splits read slices, but ChatGLM2's fused-MLP split
    (`paddle.concat` of slices) and GLM's fused-QKV split (`np.split` of a slice) fail on one. Here every
    action gets the whole array (`slice[:]`) instead, as a paddle tensor for ChatGLM2's MLP split; the split
    result is the same.
    `tied`: {file key: key whose action it shares}, for a tied weight the model's mappings leave out (GPT's
    checkpoint holds lm_head.weight, the same tensor as the split word embeddings).
    """
    bound = model_class.get_tensor_parallel_convert_actions
    own = "get_tensor_parallel_convert_actions" in model_class.__dict__
    before = model_class.__dict__.get("get_tensor_parallel_convert_actions")

    def whole(action):
        def split(x):
            x = x[:] if hasattr(x, "get_shape") else x  # a safetensors slice has get_shape
            try:
                return action(x)
            except ValueError as e:  # ChatGLM2's fused-MLP split ends in paddle.concat, which takes no numpy arrays
                if "must be list of Tensors" not in str(e):
                    raise
                import paddle

                return action(paddle.to_tensor(x)).numpy()

        return split

    def actions(cls, config, loaded_state_dict_keys, is_split=True, ignore_error=False):
        found = bound.__func__(cls, config, loaded_state_dict_keys, is_split=is_split, ignore_error=ignore_error)
        for key, same in (tied or {}).items():
            if key in loaded_state_dict_keys and same in found and key not in found:
                found[key] = found[same]
        return {k: whole(a) for k, a in found.items()}

    model_class.get_tensor_parallel_convert_actions = classmethod(actions)
    try:
        yield
    finally:
        if own:
            model_class.get_tensor_parallel_convert_actions = before
        else:
            del model_class.get_tensor_parallel_convert_actions


def model_parallel_degree() -> int:
    """Size of this process's model-parallel (tensor-parallel) group: 1 without fleet's hybrid groups."""
    try:
        from paddle.distributed import fleet

        hcg = fleet.get_hybrid_communicate_group()
    except Exception:
        return 1
    return hcg.get_model_parallel_world_size() if hcg is not None else 1


def needed() -> bool:
    """True when paddle runs on the CPU and a tensor-parallel group of more than one process exists."""
    import paddle

    return paddle.device.get_device() == "cpu" and model_parallel_degree() > 1


def install(force: bool = False) -> List[str]:
    """Give paddle's model-parallel ops their CPU meaning when `needed()` (or `force`); logs one line.

    Idempotent; returns the names replaced (empty when not needed)."""
    if PATCHED[0] in _installed or not (force or needed()):
        return [n for n in _installed if n != "device_id"]
    from paddle.distributed import collective
    from paddle.distributed.fleet.layers.mpu import mp_ops
    from paddle.distributed.fleet.meta_parallel import tensor_parallel

    for name in PATCHED:
        for module in (mp_ops, collective):
            if hasattr(module, name):
                setattr(module, name, REPLACEMENTS[name])
        _installed.append(name)
    tensor_parallel.broadcast_input_data = broadcast_input_data
    _installed.append("broadcast_input_data")
    log.info(f"CPU tensor parallel: {', '.join(n.lstrip('_') for n in _installed)} run through gloo's all_reduce/all_gather "
             f"(paddle has no CPU kernels for them); model-parallel degree {model_parallel_degree()}")
    return [n for n in _installed if n != "device_id"]


# ------------------------------------------------------------------ pipeline parallel
def pipeline_config(config: str) -> str:
    """PaddleNLP's pipeline_parallel_config with what a CPU needs added (unchanged on GPUs).

    Workaround (paddle 3.3.1 CPU): the pipeline's batched send/recv runs on the "calc stream", which
    ProcessGroupGLOO refuses ("does not support send with sync_op and use_calc_stream flag");
    `disable_batch_p2p_comm` makes paddle use plain isend/irecv, which gloo runs."""
    import paddle

    words = (config or "").split()
    if paddle.device.get_device() == "cpu" and "disable_batch_p2p_comm" not in words:
        words.append("disable_batch_p2p_comm")
    return " ".join(words)


def install_pipeline() -> bool:
    """Let paddle's PipelineLayer be built on CPU processes; logs one line. No-op on GPUs; idempotent.

    Workaround (paddle 3.3.1 CPU): PipelineLayer.__init__ reads `ParallelEnv().device_id`, which is only set
    for GPU/XPU/custom devices (AttributeError '_device_id' on a CPU); a CPU has device 0."""
    import paddle
    from paddle.distributed import parallel

    if paddle.device.get_device() != "cpu" or "device_id" in _installed:
        return False
    parallel.ParallelEnv.device_id = property(lambda self: getattr(self, "_device_id", 0))
    _installed.append("device_id")
    log.info("CPU pipeline parallel: stages exchange activations with gloo's isend/irecv (disable_batch_p2p_comm), "
             "ParallelEnv.device_id is 0")
    return True

