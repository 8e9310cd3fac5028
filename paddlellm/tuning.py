"""What the training commands (finetune, dpo) share: checks of the fine-tuning arguments, the run's family,
the model with its LoRA or prefix adapters, and the files of the output folder."""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Tuple

from .arguments import UserError, check_can_create, check_sampling, dump_args, require_at_least
from .chat_template import check_choice as check_chat_template
from .files import META_FILE, write_json
from .formats.hf import save_tokenizer

log = logging.getLogger("paddlellm")


def check_ranges(model_args, data_args, gen_args, training: Dict) -> None:
    """Refuse values that can't work before anything loads (paddle would fail later with a traceback)."""
    from .loading import check_adapter_folders

    m, d = model_args, data_args
    require_at_least({
        "src_length": d.src_length, "tgt_length": d.tgt_length,
        "intokens_max_length": d.intokens_max_length if d.intokens else None,
        "lora_rank": m.lora_rank if m.lora and not m.lora_path else None,
        "num_prefix_tokens": m.num_prefix_tokens if m.prefix_tuning and not m.prefix_path else None,
        **{k: training.get(k) for k in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")},
    })
    pp = int(training.get("pipeline_parallel_degree") or 1)
    if pp > 1 and (m.lora or m.lora_path or m.prefix_tuning or m.prefix_path or d.intokens):
        what = "--intokens" if d.intokens else "LoRA" if (m.lora or m.lora_path) else "prefix tuning"
        raise UserError(f"--pipeline_parallel_degree {pp} with {what}: pipeline parallel fine-tunes whole models (SFT) "
                        "without packing here; use tensor_parallel_degree or data parallel for it")
    tp = int(training.get("tensor_parallel_degree") or 1)
    if tp > 1 and (m.prefix_tuning or m.prefix_path):
        # paddlenlp 3.0.0b4 cuts a tensor-parallel prefix by position in its flattened [layers*2, heads, head_dim]
        # vector, not by head: its shards mean something else than a single-card prefix and can't be merged into one
        raise UserError(f"--prefix_tuning with --tensor_parallel_degree {tp}: paddlenlp's tensor-parallel prefix is laid out "
                        "differently from a single-card one (its shards can't be merged); train the prefix with data parallel")
    if (training.get("learning_rate") or 0) < 0:
        raise UserError(f"--learning_rate must not be negative, got {training['learning_rate']}")
    if training.get("output_dir"):
        check_can_create(training["output_dir"], "output_dir")
    check_sampling(top_k=gen_args.top_k, top_p=gen_args.top_p)
    check_chat_template(model_args.chat_template)
    check_adapter_folders(m.lora_path, m.prefix_path)
    from .formats.quantized import refuse_if_quantized
    from .formats.static import refuse_if_static

    refuse_if_quantized(m.model_name_or_path)  # integer weights can't be trained further
    refuse_if_static(m.model_name_or_path)  # a program without trainable weights


def resolve_family(model_args):
    from .loading import checked_family

    m = model_args
    return checked_family(m.family, m.model_name_or_path, m.lora_path, m.prefix_path)


def all_linear_targets(model) -> List[str]:
    """Regexes naming every nn.Linear layer of the model, by its last name component (e.g. '.*q_proj')."""
    import paddle.nn as nn

    suffixes = []
    for name, layer in model.named_sublayers():
        if isinstance(layer, nn.Linear) or type(layer).__name__ in ("ColumnParallelLinear", "RowParallelLinear"):
            last = name.split(".")[-1]
            if last not in ("lm_head",) and last not in suffixes:
                suffixes.append(last)
    return [f".*{s}$" for s in suffixes]


def check_tensor_parallel_shapes(family, path: str, tp: int, sizes: Optional[Dict[str, Tuple[int, str]]] = None) -> None:
    """Sizes tensor parallel splits over the processes must be divisible by the degree (paddlenlp asserts deep inside).

    `sizes`: {config key: (value, where it comes from)} for values the run sets itself instead of config.json's
    (pretraining's padded vocabulary)."""
    try:
        config = family.paddlenlp_class("config_class").from_pretrained(path)
    except Exception:  # not a paddlenlp folder (e.g. transformers'): its loader reports problems itself
        return
    for name in ("vocab_size", "num_attention_heads", "num_key_value_heads", "multi_query_group_num"):
        value, where = (sizes or {}).get(name) or (getattr(config, name, None), f"{path}/config.json has")
        if isinstance(value, int) and value > 0 and value % tp:
            raise UserError(f"--tensor_parallel_degree {tp}: {where} {name} {value}, which does not split "
                            f"into {tp} equal parts; choose a degree that divides it")


def tensor_parallel_overrides(family, path: str, training_args, sizes: Optional[Dict[str, Tuple[int, str]]] = None) -> Dict:
    """Config overrides that build this process's shard of a tensor-parallel model (empty without tensor parallel).

    Shared by fine-tuning and pretraining. Installs paddle's model-parallel ops on CPU (through gloo; a no-op on
    GPUs) and checks the split sizes of `path`'s config (`sizes`: see check_tensor_parallel_shapes).
    tensor_parallel_output false: the model gathers full-vocabulary logits, so the loss, evaluation and generation
    read them as in one process (paddlenlp's parallel loss is left to pretraining-size vocabularies)."""
    tp = max(training_args.tensor_parallel_degree, 1)
    if tp <= 1:
        return {}
    from .cpu_parallel import install

    install()  # on CPU: paddle's model-parallel ops through gloo (no-op on GPUs)
    check_tensor_parallel_shapes(family, path, tp, sizes)
    return dict(tensor_parallel_degree=tp, tensor_parallel_rank=training_args.tensor_parallel_rank, tensor_parallel_output=False)


def build_model(family, model_args, training_args, tokenizer):
    """Load the base model and wrap it for LoRA or Prefix Tuning as asked. Returns (model, kind)."""
    tp = max(training_args.tensor_parallel_degree, 1)
    extra = tensor_parallel_overrides(family, model_args.model_name_or_path, training_args)
    if max(training_args.pipeline_parallel_degree, 1) > 1:  # this process's stage of paddlenlp's *Pipe model
        from .cpu_parallel import install_pipeline

        install_pipeline()  # on CPU: PipelineLayer can be built (no-op on GPUs)
        model = family.load_pipe_model(model_args.model_name_or_path, dtype=model_args.dtype, **extra)
        log.info(f"full fine-tuning, pipeline stage {training_args.pipeline_parallel_rank} of {training_args.pipeline_parallel_degree}: "
                 f"{sum(int(p.numel()) for p in model.parameters()):,} parameters")
        return model, "full"
    model = family.load_model(model_args.model_name_or_path, dtype=model_args.dtype, **extra)
    from .cpu_kernels import apply as apply_cpu_kernels
    model = apply_cpu_kernels(family, model)  # cheaper CPU formulations of the same maths (not on GPUs)
    kind = "full"
    if model_args.lora or model_args.lora_path:
        from paddlenlp.peft import LoRAConfig, LoRAModel

        kind = "lora"
        if model_args.lora_path:
            model = LoRAModel.from_pretrained(model, model_args.lora_path)
            model.mark_only_lora_as_trainable()
        else:
            targets = model_args.lora_target_modules or family.lora_target_modules or all_linear_targets(model)
            cfg = LoRAConfig(
                target_modules=targets, r=model_args.lora_rank, lora_alpha=model_args.lora_alpha or 2 * model_args.lora_rank,
                merge_weights=False, tensor_parallel_degree=tp, dtype=model_args.dtype,
                base_model_name_or_path=os.path.abspath(model_args.model_name_or_path) if os.path.isdir(model_args.model_name_or_path) else model_args.model_name_or_path,
            )
            model = LoRAModel(model, cfg)
            model.mark_only_lora_as_trainable()
    elif model_args.prefix_tuning or model_args.prefix_path:
        from paddlenlp.peft import PrefixConfig, PrefixModelForCausalLM

        kind = "prefix"
        try:
            postprocess, pad_mask = family.prefix_hooks()
        except NotImplementedError as e:
            raise UserError(f"--prefix_tuning: {e}") from None
        if model_args.prefix_path:
            model = PrefixModelForCausalLM.from_pretrained(model, model_args.prefix_path, postprocess, pad_mask)
        else:
            cfg = PrefixConfig(num_prefix_tokens=model_args.num_prefix_tokens, prefix_projection=model_args.prefix_projection,
                               tensor_parallel_degree=tp, dtype=model_args.dtype, **family.prefix_config_kwargs(model.config))
            model = PrefixModelForCausalLM(model, cfg, postprocess, pad_mask)
    trainable = sum(int(p.numel()) for p in model.parameters() if not p.stop_gradient)
    total = sum(int(p.numel()) for p in model.parameters())
    if kind == "lora" and not model_args.lora_path and trainable == 0:
        raise UserError(f"--lora_target_modules {' '.join(model_args.lora_target_modules or [])}: no layer of the model matches; "
                        f"its Linear layers are {', '.join(t[2:-1] for t in all_linear_targets(model))}")
    log.info(f"{kind} fine-tuning: {trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")
    return model, kind


def training_setup(training: Dict, family, source: str, chat_template=None):
    """(TrainingArguments, tokenizer) of a training run: paddlenlp's TrainingArguments from the resolved dict
    (a bad value is one UserError line), seeded, this rank's logging, and the tokenizer of `source`."""
    from paddlenlp.trainer import TrainingArguments, set_seed

    try:
        training_args = TrainingArguments(**training)
    except (ValueError, TypeError) as e:
        raise UserError(f"training arguments: {e}") from None
    set_seed(training_args.seed)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO if training_args.local_rank in (-1, 0) else logging.WARNING)
    try:
        tokenizer = family.load_tokenizer(source, chat_template=chat_template)
    except UserError:
        raise
    except Exception as e:  # a wrong path or name: one line, not paddlenlp's traceback
        raise UserError(f"model_name_or_path {source!r}: can't load its tokenizer "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return training_args, tokenizer


def save_outputs(trainer, tokenizer, family, kind, model_args, data_args, gen_args, training_args) -> None:
    """Save the model (or only the adapters), tokenizer, resolved arguments and our metadata."""
    out = training_args.output_dir
    trainer.save_final_model(out, kind)  # a full model as model.safetensors, like every other command's output
    if not training_args.should_save:
        return
    chosen = save_tokenizer(tokenizer, out)  # with its chat template and stop tokens, so the output chats the same way
    base = model_args.model_name_or_path
    meta = {
        "family": family.name,
        "kind": kind,
        "base_model": os.path.abspath(base) if os.path.isdir(base) else base,
        "src_length": data_args.src_length,
        "tgt_length": data_args.tgt_length,
        "dtype": model_args.dtype,
        "chat_format": family.name,
        "chat_template": chosen,
    }
    if kind == "lora":
        meta["lora_rank"] = model_args.lora_rank
    if kind == "prefix":
        meta["num_prefix_tokens"] = model_args.num_prefix_tokens
    write_json(os.path.join(out, META_FILE), meta)
    write_json(os.path.join(out, "finetune_args.json"), dump_args(model_args, data_args, gen_args, training_args.to_dict()))
