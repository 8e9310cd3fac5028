"""A lean decode loop giving exactly what paddlenlp's generate() gives (greedy and seeded sampling).

paddlenlp 3.0.0b4's generate() spends a good part of every decode step outside the model: it deep-copies
its generation config, computes scores nobody reads (log-softmax, gather, running mean), runs stopping
criteria objects and rebuilds per-step bookkeeping. This loop keeps only what decides the tokens:

- the model is called exactly as generate() calls it: ``model.prepare_inputs_for_generation`` before and
  ``model.update_model_kwargs_for_generation`` after each step (these are the family's own cache, mask and
  position rules, including overrides our families install), so any model generate() drives -- also a
  shell whose forward is a static-graph predictor -- is driven the same way;
- the logits go through the same processors (paddlenlp's, built by ``model.get_logits_processor`` from
  the same settings, then the caller's), and the next token is chosen by the same ops in the same order:
  argmax for greedy; softmax / temperature / TopKProcess / TopPProcess / one ``paddle.multinomial`` over the
  whole batch per step for sampling, so a seeded run consumes the random generator exactly as
  paddlenlp's sample() does and picks the same tokens;
- finished rows are fed the pad token, and the loop ends when every row has produced the stop token or
  after max_new_tokens steps, as generate() does.

The other per-step cost this removes is not Python: the KV cache grows by concatenation inside the model
(one new [batch, heads, length, head_dim] tensor per layer, key and value, per step) and glibc returns each
such block (above its mmap threshold) to the system when freed, so every step page-faults fresh memory
in; see cpu_runtime.keep_freed_memory (set for every command by runtime.setup_runtime, and here again for
callers that did not go through it). A family's decode_runner (families/decode_core.py: LLaMA, Qwen2, GPT, OPT,
Bloom) avoids the concatenation itself.
"""
from __future__ import annotations

from typing import Optional

from .cpu_runtime import keep_freed_memory, set_malloc_thresholds  # noqa: F401  (bench/ resets them per arm)


def _generation_settings(model):
    """The generation config generate() would start from (model's generation_config.json or its config)."""
    from paddlenlp.generation import GenerationConfig

    gc = getattr(model, "generation_config", None)
    if gc is None or getattr(gc, "_from_model_config", False):
        gc = GenerationConfig.from_model_config(model.config)
    return gc


def _first(value, fallback):
    return value if value is not None else fallback


def _with_custom(builtin, custom):
    """The processor list generate() runs: its built-in processors, except those whose type the caller also
    gives (the caller's instance replaces it), then the caller's, in the caller's order."""
    from paddlenlp.generation import LogitsProcessorList

    if custom is None:
        return builtin
    custom = list(custom._processors.values()) if hasattr(custom, "_processors") else list(custom)
    given = {type(p) for p in custom}
    return LogitsProcessorList([p for p in builtin._processors.values() if type(p) not in given] + custom)


def decode_ids(model, inputs, max_new_tokens: int, eos_token_id, pad_token_id: Optional[int], top_k: int = 1,
               top_p: float = 1.0, temperature: float = 1.0, repetition_penalty: float = 1.0,
               logits_processors=None, streamer=None, runner=None):
    """Generate up to max_new_tokens for a left-padded batch; returns the [batch, steps] tensor of new ids.

    The same result as ``model.generate(**inputs, max_new_tokens=..., decode_strategy=greedy_search|sampling,
    ...)[0]`` with these settings (top_k=1 is greedy). logits_processors (a paddlenlp LogitsProcessorList or a
    list, each called (input_ids so far, logits) -> logits) combine with paddlenlp's own ones as in
    generate(); eos_token_id is one stop id or a list of them; streamer gets put([batch, 1] tokens) every step and end() at the end. runner (a family's
    decode_runner: an in-place KV cache) computes each step's logits instead of the model's forward.
    """
    import paddle
    import paddle.nn.functional as F
    from paddlenlp.generation.logits_process import TopKProcess, TopPProcess

    from .families.base import logits_of

    keep_freed_memory()
    config = model.config
    gc = _generation_settings(model)
    stops = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]  # generate() takes a list too
    if pad_token_id is None:  # as generate()'s set_pad_token_id
        pad_token_id = stops[0]
    model_kwargs = dict(inputs)
    input_ids = model_kwargs.pop("input_ids")
    model_kwargs["use_cache"] = True
    batch, origin_len = input_ids.shape
    # generate() falls back to the model's generation settings for these; mirror it so a checkpoint's
    # min_length / forced tokens / n-gram rule act the same here.
    min_new = gc.min_new_tokens or (gc.min_length if gc.min_length else 0)
    builtin = model.get_logits_processor(
        min_length=origin_len + min_new if min_new > 0 else None,
        max_length=origin_len + max_new_tokens,
        eos_token_id=eos_token_id,
        forced_bos_token_id=_first(gc.forced_bos_token_id, getattr(config, "forced_bos_token_id", None)),
        forced_eos_token_id=_first(gc.forced_eos_token_id, getattr(config, "forced_eos_token_id", None)),
        num_beams=1, num_beam_groups=1, diversity_rate=0.0, repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=_first(gc.no_repeat_ngram_size, getattr(config, "no_repeat_ngram_size", None)),
    )
    processors = _with_custom(builtin, logits_processors)
    sampling = top_k != 1
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    unfinished = paddle.full([batch, 1], True, dtype="bool")
    pads = paddle.full([batch, 1], pad_token_id, dtype=input_ids.dtype)
    next_tokens = None
    for step in range(max_new_tokens):
        if runner is not None:
            last = runner.prefill(inputs, origin_len + max_new_tokens) if step == 0 else runner.step(next_tokens)
        else:
            model_inputs = model.prepare_inputs_for_generation(input_ids, **model_kwargs)
            if sampling:  # as sample(): drop the old cache reference before the step
                model_kwargs["cache"] = None
                model_kwargs["past_key_values"] = None
            outputs = model(**model_inputs)
            last = logits_of(outputs)[:, -1, :]
        logits = model.adjust_logits_during_generation(last)
        logits = processors(input_ids, logits)
        if sampling:
            if temperature is not None and temperature != 1.0:
                logits = logits / temperature
            probs = F.softmax(logits)
            if top_k is not None and top_k != 0:
                probs = TopKProcess(probs, top_k, 1)
            if top_p is not None and top_p < 1.0:
                probs = TopPProcess(probs, top_p, 1)
            next_tokens = paddle.multinomial(probs)
        else:
            next_tokens = paddle.argmax(logits, axis=-1).unsqueeze(-1)
        next_tokens = paddle.where(unfinished, next_tokens, pads)
        input_ids = paddle.concat([input_ids, next_tokens], axis=1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        for stop in stops:  # as generate()'s get_unfinished_flag
            unfinished = paddle.logical_and(unfinished, next_tokens != stop)
        if step + 1 == max_new_tokens or not bool(unfinished.any()):
            break
        if runner is None:
            model_kwargs = model.update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=encoder_decoder)
    if streamer is not None:
        streamer.end()
    return input_ids[:, origin_len:]
