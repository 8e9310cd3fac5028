import os, sys, time, tempfile
from paddlellm.runtime import setup_runtime
setup_runtime(quiet=True)
import paddle
from paddlellm.commands.tiny import build_tiny
from paddlellm.loading import load_for_inference
from paddlellm.families import decode_core
clock = time.process_time
def t(f, n=6):
    f(); s = clock()
    for _ in range(n): f()
    return (clock() - s) / n * 1000
tmp = tempfile.mkdtemp()
for name, over in (("opt", dict(hidden_size=576, num_hidden_layers=2, word_embed_proj_dim=576)), ("gpt-3", dict(hidden_size=576, num_hidden_layers=2)), ("bloom", dict(hidden_size=576, n_layer=2))):
    model, tok, fam, _ = load_for_inference(build_tiny(name, os.path.join(tmp, name), 49152, **over))
    for batch in (1, 8):
        runner = fam.decode_runner(model)
        runner.max_capacity, runner.next_slot, runner._stepping = 100, 10, True
        h = paddle.randn([batch, 1, 576])
        with paddle.no_grad():
            own = (lambda: model.lm_head(h)) if name != "bloom" else (lambda: model.lm_head(h, model.config.tensor_parallel_output))
            if name == "opt": new = lambda: runner._head(h)
            elif name == "gpt-3": new = lambda: runner._logits(h)  # includes the final norm
            else: new = lambda: runner._logits(h)
            print(name, batch, "model head %.1f ms, runner %.1f ms (%s)" % (t(own), t(new), "incl. final norm" if name != "opt" else "head only"),
                  "copy" if runner._head_t is not None else "no copy", flush=True)
