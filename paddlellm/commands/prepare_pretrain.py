"""`create_pretraining_data.py` / `paddlellm prepare-pretrain`: tokenize a corpus into PaddleNLP's PREFIX.bin + PREFIX.idx
(the work is paddlellm.pretrain_data.create)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..arguments import UserError, fail, parse_args
from ..pretrain_data import create


@dataclass
class PreprocessArgument:
    model_name_or_path: str = field(default=None, metadata={"help": "Tokenizer source: a model folder (also an output folder of ours) or a PaddleNLP model name."})
    family: Optional[str] = field(default=None, metadata={"help": "Model family when it can't be read from the model folder: llama chatglm chatglm_v2 bloom gpt-3 opt glm qwen2."})
    input_path: str = field(default=None, metadata={"help": "A file or a folder (walked recursively, in sorted order): *.jsonl (one JSON document per line), *.jsonl.zst (needs the zstandard package), *.txt (documents separated by blank lines)."})
    output_prefix: str = field(default=None, metadata={"help": "Writes OUTPUT_PREFIX.bin, OUTPUT_PREFIX.idx and OUTPUT_PREFIX.json."})
    data_format: str = field(default="JSON", metadata={"help": "Format of the .jsonl input (JSON, as PaddleNLP)."})
    json_key: str = field(default="text", metadata={"help": "Field of each JSON line that holds the document text."})
    append_eos: bool = field(default=False, metadata={"help": "Append the tokenizer's EOS to every document (what GPT/LLaMA pretraining expects)."})
    data_impl: str = field(default="mmap", metadata={"help": "Output format: mmap (PaddleNLP's default; the only one written)."})
    workers: int = field(default=1, metadata={"help": "Tokenizer processes."})
    log_interval: int = field(default=100, metadata={"help": "Update the documents/tokens-per-second figures every this many documents."})
    max_doc_num: Optional[int] = field(default=None, metadata={"help": "Stop after this many documents."})


def main(argv=None) -> int:
    (args,) = parse_args([PreprocessArgument], argv, prog="create_pretraining_data.py",
                         description="Tokenize a corpus into PaddleNLP's pretraining files PREFIX.bin + PREFIX.idx.", json_file_ok=False)
    try:
        create(args)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; nothing written", status=130)
    return 0
