"""Generation shared by fine-tuning evaluation, batch prediction and serving."""
from __future__ import annotations

from typing import Dict, List, Optional


def generate_ids(model, tokenizer, family, prompts: List[List[int]], max_new_tokens: int, top_k: int = 1,
                 top_p: float = 1.0, temperature: float = 1.0, repetition_penalty: float = 1.0,
                 own_loop: Optional[bool] = None) -> List[List[int]]:
    """Generate a reply for every prompt (token ids, left-padded together); returns the reply ids, cut at the stop token.

    top_k=1 is greedy decoding (deterministic); otherwise sampling with top_k/top_p/temperature.
    own_loop: see generate_batch (None: the decode loop wherever it is exact, else paddlenlp's generate()).
    """
    import paddle

    inputs = {k: paddle.to_tensor(v) for k, v in _generation_inputs(family, tokenizer, prompts, max_new_tokens).items()}
    stops = family.stop_token_ids(tokenizer)  # the family's end of reply, and a checkpoint's other eos ids
    ids = generate_batch(model, family, inputs, max_new_tokens, stops[0] if len(stops) == 1 else stops, tokenizer.pad_token_id,
                         top_k=top_k, top_p=top_p, temperature=temperature, repetition_penalty=repetition_penalty, own_loop=own_loop)
    replies = []
    for row in ids.numpy().tolist():
        reply = []
        for t in row:
            if t in stops:
                break
            reply.append(t)
        replies.append(reply)
    return replies


def uses_own_loop(model, family, sampling: bool) -> bool:
    """Whether generate_batch runs paddlellm.decode_loop (else paddlenlp's generate()).

    The loop reproduces GenerationMixin.generate + greedy_search/sample; a model class (or wrapper, e.g.
    paddlenlp's PrefixModelForCausalLM, which injects its prefix cache in generate) that overrides one of
    them keeps generate(), and so does a family whose registry entry says the loop is not exact for it.
    """
    from paddlenlp.generation import GenerationMixin

    if not family.own_decode_loop:
        return False
    if not all(hasattr(model, name) for name in ("prepare_inputs_for_generation", "update_model_kwargs_for_generation", "get_logits_processor")):
        return False  # not a paddlenlp generation model (or a wrapper that hides its methods)
    if sampling and getattr(getattr(model, "config", None), "tensor_parallel_degree", 1) > 1:
        return False  # sample() broadcasts each step's tokens from one rank; the loop does not
    cls = type(model)
    strategy = "sample" if sampling else "greedy_search"
    return all(getattr(cls, name, getattr(GenerationMixin, name)) is getattr(GenerationMixin, name)
               for name in ("generate", strategy))


def generate_batch(model, family, inputs, max_new_tokens: int, eos_token_id, pad_token_id, top_k: int = 1,
                   top_p: float = 1.0, temperature: float = 1.0, repetition_penalty: float = 1.0,
                   logits_processors=None, streamer=None, own_loop: Optional[bool] = None):
    """[batch, steps] tensor of new token ids for the family's generation inputs (paddle tensors).

    Runs the lean decode loop where it gives exactly what generate() gives (uses_own_loop), else
    generate(). eos_token_id: one stop id or a list (a row ends at any of them). top_k=1 is greedy. logits_processors: a paddlenlp LogitsProcessorList (run after the
    built-in ones); streamer: gets put([batch, 1]) per step and end(). own_loop: force one path (tests and
    the benchmark compare both); None chooses.
    """
    import paddle

    from .cpu_kernels import generating, wanted

    sampling = top_k != 1
    with paddle.no_grad(), generating():
        if own_loop if own_loop is not None else uses_own_loop(model, family, sampling):
            from .decode_loop import decode_ids

            from .formats.static import inplace_runner

            # an in-place static export's runner drives its program (KV cache written in place); on CPU, a family's
            # runner (LLaMA: the same cache design) replaces the model's forward
            runner = inplace_runner(model) or (family.decode_runner(model) if wanted() else None)
            return decode_ids(model, inputs, max_new_tokens, eos_token_id, pad_token_id, top_k=max(top_k, 0) if sampling else 1,
                              top_p=top_p, temperature=temperature, repetition_penalty=repetition_penalty,
                              logits_processors=logits_processors, streamer=streamer, runner=runner)
        # paddlenlp 3.0.0b4 replaces max_new_tokens == 20 (its default) by the model's generation_config
        # max_length, so a 20-token request could run for thousands: pass max_length (= new tokens) too.
        kwargs: Dict = dict(max_new_tokens=max_new_tokens, max_length=max_new_tokens, eos_token_id=eos_token_id,
                            pad_token_id=pad_token_id, use_cache=True, repetition_penalty=repetition_penalty)
        if sampling:
            kwargs.update(decode_strategy="sampling", top_k=max(top_k, 0), top_p=top_p, temperature=temperature)
        else:
            kwargs["decode_strategy"] = "greedy_search"
        if logits_processors is not None:
            kwargs["logits_processors"] = logits_processors
        if streamer is not None:
            kwargs["streamer"] = streamer
        out = model.generate(**inputs, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


# generate() keyword -> generate_batch keyword, for the settings generate_with translates
_GENERATE_KWARGS = {"max_new_tokens": "max_new_tokens", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id",
                    "repetition_penalty": "repetition_penalty", "top_k": "top_k", "top_p": "top_p", "temperature": "temperature",
                    "logits_processors": "logits_processors", "streamer": "streamer"}


def generate_with(model, family, inputs, kwargs: Dict):
    """``model.generate(**inputs, **kwargs)[0]`` for callers that hold generate()'s keyword arguments (serving):
    run through generate_batch's decode loop when every setting is one it reproduces, else generate() itself."""
    kw = {k: v for k, v in kwargs.items() if k not in ("max_length", "use_cache", "decode_strategy")}
    strategy = kwargs.get("decode_strategy", "greedy_search")
    plain = (strategy in ("greedy_search", "sampling") and set(kw) <= set(_GENERATE_KWARGS) and kwargs.get("use_cache", True)
             and kwargs.get("max_length", kwargs.get("max_new_tokens")) == kwargs.get("max_new_tokens"))
    if plain:
        kw = {_GENERATE_KWARGS[k]: v for k, v in kw.items()}
        if strategy == "greedy_search":
            kw["top_k"] = 1
        elif kw.get("top_k", 0) == 1:  # sampling from the top 1 is greedy for generate_batch; keep generate()
            plain = False
    if plain and uses_own_loop(model, family, strategy == "sampling"):
        return generate_batch(model, family, inputs, own_loop=True, **kw)
    from .cpu_kernels import generating

    with generating():
        out = model.generate(**inputs, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _generation_inputs(family, tokenizer, prompts: List[List[int]], max_new_tokens: int):
    """family.generation_inputs, telling families that lay out positions in advance (GLM) how many tokens will come."""
    import inspect

    if "max_new_tokens" in inspect.signature(family.generation_inputs).parameters:
        return family.generation_inputs(tokenizer, prompts, max_new_tokens=max_new_tokens)
    return family.generation_inputs(tokenizer, prompts)


def decode(tokenizer, ids: List[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def length_buckets(lengths: List[int], batch_size: int) -> List[List[int]]:
    """Indices grouped into batches of similar length (longest first), so little padding is computed."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def text_metrics(predictions: List[str], references: List[str]) -> Dict[str, float]:
    """BLEU-4 and ROUGE-1/2/L (paddlenlp.metrics) over whitespace tokens, in percent."""
    from paddlenlp.metrics import BLEU, RougeL
    from paddlenlp.metrics.rouge import Rouge1, Rouge2

    preds = [p.split() for p in predictions]
    refs = [r.split() for r in references]
    bleu = BLEU(n_size=4)
    rouge_l = RougeL()
    for p, r in zip(preds, refs):
        bleu.add_inst(p, [r])
        rouge_l.add_inst(p, [r])
    out = {"bleu4": _bleu_percent(bleu), "rougel": 100 * rouge_l.score()}
    for name, metric in (("rouge1", Rouge1()), ("rouge2", Rouge2())):
        overlap, total = metric.compute(preds, refs)
        out[name] = 100 * overlap / total if total else 0.0
    out["exact_match"] = 100 * sum(p == r for p, r in zip(predictions, references)) / max(len(references), 1)
    return out


def _bleu_percent(bleu) -> float:
    """BLEU in percent; 0 when some n-gram order has no match or every prediction is empty.

    Workaround (paddlenlp 3.0.0b4 BLEU.accumulate): it divides by the predictions' total length (a
    ZeroDivisionError when every reply is empty, e.g. a model that stops at once) and replaces a zero
    n-gram precision by the smallest float, printing BLEU 0 as 1.73e-306. Geometric-mean BLEU is 0 then.
    """
    if bleu.bp_c == 0 or any(bleu.match_ngram[n] == 0 for n in range(bleu.n_size)):
        return 0.0
    return 100 * bleu.score()


def generate_replies(model, tokenizer, family, records, src_length: int, max_new_tokens: int, batch_size: int = 8, **sampling):
    """Replies (text) to the final src turn of each record, batched by prompt length, in input order."""
    prompts = [family.generation_prompt(tokenizer, r.src, r.tgt[: len(r.src) - 1], src_length) for r in records]
    out = [None] * len(records)
    for idx in length_buckets([len(p) for p in prompts], batch_size):
        for i, ids in zip(idx, generate_ids(model, tokenizer, family, [prompts[i] for i in idx], max_new_tokens, **sampling)):
            out[i] = decode(tokenizer, ids)
    return out
