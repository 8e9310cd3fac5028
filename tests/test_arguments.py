"""The argument system: JSON file + overrides, booleans, errors, fast --help, every shipped JSON."""
import glob
import json
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import pytest

from conftest import ROOT, run_cmd
from paddlellm.arguments import TRAINING_FIELDS_FILE, parse_args


@dataclass
class A:
    name: str = field(default="x", metadata={"help": "a name"})
    n: int = 1
    rate: float = 0.5
    flag: bool = False
    opt: Optional[int] = None
    items: Optional[List[str]] = None


def write(tmp_path, obj, name="args.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


def test_json_then_overrides_win(tmp_path):
    path = write(tmp_path, {"name": "file", "n": 3, "flag": True, "rate": 2})
    (a,) = parse_args([A], [path, "--n", "7", "--flag", "false", "--items", "a,b"])
    assert (a.name, a.n, a.rate, a.flag, a.items) == ("file", 7, 2.0, False, ["a", "b"])


@pytest.mark.parametrize("argv,expected", [(["--flag"], True), (["--flag", "true"], True), (["--flag", "false"], False),
                                           (["--flag=true"], True), (["--flag", "--n", "2"], True)])
def test_boolean_forms(argv, expected):
    (a,) = parse_args([A], argv)
    assert a.flag is expected


def test_training_kwargs_are_separated(tmp_path):
    (a, training) = parse_args([A], ["--n", "2", "--learning_rate", "0.1", "--do_train", "--output_dir", "o"], training=True)
    assert a.n == 2 and training == {"learning_rate": 0.1, "do_train": True, "output_dir": "o"}


def _error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([A], argv, training=True)
    assert e.value.code == 2
    return capsys.readouterr().err.strip()


def test_errors_name_the_problem(tmp_path, capsys):
    assert _error(["--nn", "1"], capsys) == "error: unknown argument --nn (did you mean --n?)"
    assert _error(["--n", "abc"], capsys) == 'error: --n: n must be an integer, got "abc"'
    assert _error(["--flag", "maybe"], capsys).startswith("error: unexpected argument 'maybe'")
    bad = write(tmp_path, '{\n  "n": 1,\n  "rate": oops\n}')
    assert _error([bad], capsys) == f"error: {bad}:3:11: invalid JSON: Expecting value"
    wrong = write(tmp_path, {"n": "three"}, "w.json")
    assert _error([wrong], capsys) == f'error: {wrong}: n must be an integer, got "three"'
    unknown = write(tmp_path, {"lerning_rate": 1}, "u.json")
    assert _error([unknown], capsys) == f"error: {unknown}: unknown argument 'lerning_rate' (did you mean --learning_rate?)"
    assert _error([str(tmp_path / "missing.json")], capsys) == f"error: {tmp_path / 'missing.json'}: no such argument file"
    assert _error(["--evaluation_strategy", "often"], capsys) == "error: --evaluation_strategy: evaluation_strategy must be one of no, steps, epoch, got 'often'"
    latin1 = tmp_path / "l.json"
    latin1.write_bytes('{"name": "café"}'.encode("latin-1"))
    assert _error([str(latin1)], capsys) == f"error: {latin1}: not UTF-8 text (byte 0xe9 at offset 13); save the file as UTF-8"


def test_argument_file_with_byte_order_mark(tmp_path):
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"n": 7}\r\n')
    (a,) = parse_args([A], [str(bom)])
    assert a.n == 7


def test_help_lists_every_field_without_importing_paddle():
    code = ("import atexit, sys; atexit.register(lambda: print('PADDLE_LOADED' if 'paddle' in sys.modules else 'PADDLE_NOT_LOADED'));"
            "from paddlellm.cli import main; main(['finetune', '--help'])")
    proc = run_cmd([sys.executable, "-c", code])
    out = proc.stdout
    for name in ("--model_name_or_path", "--lora_rank", "--num_prefix_tokens", "--intokens_max_length", "--top_p",
                 "--tensor_parallel_degree", "--recompute", "--per_device_train_batch_size", "--fp16"):
        assert name in out
    assert "Maximum tokens of the final reply" in out
    assert out.strip().endswith("PADDLE_NOT_LOADED")


def test_training_snapshot_matches_installed_paddlenlp():
    from paddlellm.arguments import training_fields_snapshot

    with open(TRAINING_FIELDS_FILE, encoding="utf-8") as f:
        shipped = json.load(f)
    assert shipped == json.loads(json.dumps(training_fields_snapshot())), "run: python -m paddlellm.arguments"


# ptq_ / gptq_argument.json belong to the quantization command (parsed in test_quant.py),
# pretrain_argument.json to run_pretrain.py (parsed in test_pretrain.py), dpo_argument.json to run_dpo.py (test_dpo.py)
ARG_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "llm", "*", "*_argument.json"))
                   if not os.path.basename(p).startswith(("ptq_", "gptq_", "pretrain_", "dpo_")))


def test_every_family_ships_three_argument_files():
    from paddlellm.families import names

    for fam in names():
        for kind in ("sft", "lora", "pt"):
            assert os.path.join(ROOT, "llm", fam, f"{kind}_argument.json") in ARG_FILES


@pytest.mark.parametrize("path", ARG_FILES, ids=[os.path.relpath(p, ROOT) for p in ARG_FILES])
def test_shipped_argument_files_parse(path):
    from paddlellm.families import find_by_name
    from paddlellm.commands.finetune import parse

    model_args, data_args, gen_args, training = parse([path])
    family_dir = os.path.basename(os.path.dirname(path))
    assert find_by_name(model_args.model_name_or_path).name == family_dir
    kind = os.path.basename(path).split("_")[0]
    assert model_args.lora == (kind == "lora") and model_args.prefix_tuning == (kind == "pt")
    assert training["output_dir"] and data_args.dataset_name_or_path == "./data"
    # TrainingArguments accepts every value (constructed without a GPU check)
    from paddlenlp.trainer import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    assert all(k in fields for k in training)


def test_readme_gives_two_commands_and_no_section_twice():
    import re

    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    headings = re.findall(r"^#{1,3} .+$", text, flags=re.M)
    assert len(headings) == len(set(headings)), [h for h in headings if headings.count(h) > 1]
    fresh = text.split("## Two commands for a fresh machine", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in fresh.strip().splitlines()] == ["make quickstart", "make test"]
    assert open(os.path.join(ROOT, ".ci", "run")).read().strip().splitlines()[-1].endswith("make test")


def test_console_command_lists_commands_and_version():
    from paddlellm import __version__

    out = run_cmd([sys.executable, "-m", "paddlellm.cli", "--help"]).stdout
    for command in ("finetune", "predict", "merge-lora", "merge-tp", "serve", "tiny", "quickstart"):
        assert f"  {command} " in out
    assert run_cmd([sys.executable, "-m", "paddlellm.cli", "--version"]).stdout.strip() == f"paddlellm {__version__}"
    bad = run_cmd([sys.executable, "-m", "paddlellm.cli", "finetuen"], check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown command 'finetuen'; did you mean 'finetune'?")


def test_console_command_without_a_command_is_a_usage_error():
    proc = run_cmd([sys.executable, "-m", "paddlellm.cli"], check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("usage: paddlellm <command> [args]")


def test_generation_evaluation_help_says_metrics_are_reported_together():
    out = run_cmd([sys.executable, os.path.join(ROOT, "finetune_generation.py"), "--help"]).stdout
    line = out.split("--eval_with_do_generation", 1)[1].splitlines()[1].strip()
    assert line == "Also evaluate by generating replies: BLEU-4 and ROUGE-1/2/L are reported together with loss/ppl/accuracy."


def test_family_readmes_are_current():
    """llm/<family>/README.md is generated from the registry (python -m paddlellm.families)."""
    from paddlellm.families import all_families, family_readme

    for fam in all_families().values():
        with open(os.path.join(ROOT, "llm", fam.name, "README.md"), encoding="utf-8") as f:
            assert f.read() == family_readme(fam), "run: python -m paddlellm.families"
