"""paddlellm.decode_loop gives token for token what paddlenlp's generate() gives, for every family:
greedy and seeded sampling (top_k, top_p, temperature, repetition penalty), on left-padded batches of
mixed prompt lengths, with rows that stop at different steps; plus the streamer and logits-processor hooks
serving uses."""
import numpy as np
import pytest

from paddlellm.families import names

TEXTS = ["hello there", "spell: 1 2 3 4 5 6 and more words here", "x y z w", "one two three four five six seven eight nine ten"]
NEW = 10
# families whose own loop runs a decode runner (families/*_decode.py, KV cache in place) on CPU instead of the forward
WITH_RUNNER = {"llama", "qwen2", "gpt-3", "opt", "bloom", "chatglm_v2", "chatglm", "glm"}


def run(model, tok, fam, own_loop, max_new=NEW, stop=None, seed=None, runners=None, **settings):
    """runners: a list that gets the runner the decode loop was given (None: the model's forward)."""
    import paddle

    from paddlellm import decode_loop
    from paddlellm.generation import _generation_inputs, generate_batch

    prompts = [fam.generation_prompt(tok, [t], [], 32) for t in TEXTS]
    inputs = {k: paddle.to_tensor(v) for k, v in _generation_inputs(fam, tok, prompts, max_new).items()}
    stop = fam.stop_token_id(tok) if stop is None else stop
    if seed is not None:
        paddle.seed(seed)
    real_decode = decode_loop.decode_ids

    def spy(*a, **kw):
        runners.append(kw.get("runner"))
        return real_decode(*a, **kw)

    if runners is not None:
        decode_loop.decode_ids = spy
    try:
        out = generate_batch(model, fam, inputs, max_new, stop, tok.pad_token_id, own_loop=own_loop, **settings)
    finally:
        decode_loop.decode_ids = real_decode
    return out.numpy()


@pytest.mark.parametrize("name", names())
def test_loop_matches_generate(loaded, name):
    from paddlellm.generation import uses_own_loop

    model, tok, fam = loaded(name)
    assert uses_own_loop(model, fam, sampling=False) and uses_own_loop(model, fam, sampling=True)
    assert len({len(fam.generation_prompt(tok, [t], [], 32)) for t in TEXTS}) > 2  # really mixed lengths

    greedy = run(model, tok, fam, own_loop=False)
    assert greedy.shape == (len(TEXTS), NEW)
    runners = []
    np.testing.assert_array_equal(run(model, tok, fam, own_loop=True, runners=runners), greedy)
    assert (runners[0] is not None) == (name in WITH_RUNNER)  # the own loop below runs through the runner where one exists

    # Rows that end early: stop at the token row 0 produced at step 3 (random weights rarely emit the real
    # stop token), so finished rows get pad tokens while the others go on, and the batch may end early.
    stop = int(greedy[0, 3])
    ref = run(model, tok, fam, own_loop=False, stop=stop, repetition_penalty=1.3)
    assert (ref == stop).any()
    np.testing.assert_array_equal(run(model, tok, fam, own_loop=True, stop=stop, repetition_penalty=1.3), ref)

    settings = dict(top_k=5, top_p=0.9, temperature=0.7, repetition_penalty=1.2)
    sampled = run(model, tok, fam, own_loop=False, seed=11, **settings)
    np.testing.assert_array_equal(run(model, tok, fam, own_loop=True, seed=11, **settings), sampled)
    assert not np.array_equal(run(model, tok, fam, own_loop=True, seed=12, **settings), sampled)  # the seed matters
    # top_k=0: nucleus sampling alone, at temperature 1
    nucleus = run(model, tok, fam, own_loop=False, seed=5, top_k=0, top_p=0.8)
    np.testing.assert_array_equal(run(model, tok, fam, own_loop=True, seed=5, top_k=0, top_p=0.8), nucleus)


def test_streamer_and_processors(loaded):
    """What serving relies on (generation.generate_with, given generate()'s keyword arguments): put() gets each
    step's [batch, 1] tokens and end() once; caller processors see input_ids growing by one column per step,
    can force tokens, and replace paddlenlp's own processor of the same type (as in generate())."""
    import paddle
    from paddlenlp.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from paddlellm.generation import _generation_inputs, generate_with
    from paddlellm.serve.engine import _processor_list  # the LogitsProcessorList generate() accepts

    model, tok, fam = loaded("llama")

    class Streamer:
        def __init__(self):
            self.steps, self.ended = [], 0

        def put(self, value):
            self.steps.append(value.numpy().copy())

        def end(self):
            self.ended += 1

    seen = []

    def force_seven_in_row_one(input_ids, logits):
        seen.append(input_ids.shape[1])
        mask = np.zeros(logits.shape, dtype=bool)
        mask[1, :] = True
        mask[1, 7] = False
        return paddle.where(paddle.to_tensor(mask), paddle.full_like(logits, -1e9), logits)

    prompts = [fam.generation_prompt(tok, [t], [], 32) for t in TEXTS]
    inputs = {k: paddle.to_tensor(v) for k, v in _generation_inputs(fam, tok, prompts, NEW).items()}
    outs = []
    for own in (False, True):
        streamer = Streamer()
        seen.clear()
        kwargs = dict(max_new_tokens=NEW, max_length=NEW, eos_token_id=fam.stop_token_id(tok), pad_token_id=tok.pad_token_id,
                      use_cache=True, repetition_penalty=1.5, decode_strategy="greedy_search", streamer=streamer,
                      logits_processors=_processor_list([force_seven_in_row_one, RepetitionPenaltyLogitsProcessor(1.5)]))
        with paddle.no_grad():
            if own:
                model.generate = None  # generate_with must not fall back to generate() here
                try:
                    out = generate_with(model, fam, inputs, kwargs)
                finally:
                    del model.generate
            else:
                out = model.generate(**inputs, **kwargs)[0]
        outs.append(out.numpy())
        assert streamer.ended == 1
        np.testing.assert_array_equal(np.concatenate(streamer.steps, axis=1), outs[-1])
        assert np.diff(seen).tolist() == [1] * (NEW - 1)
    np.testing.assert_array_equal(outs[1], outs[0])
    assert (outs[1][1] == 7).all()
