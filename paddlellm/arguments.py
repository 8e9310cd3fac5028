"""One argument system for every command.

    python <script>.py [ARGS.json] [--key value | --key=value | --flag | --flag true|false] ...

A JSON file (first argument) gives the values; command-line overrides win. Every field of every
group is listed by `--help` with its help text. PaddleNLP's TrainingArguments fields are known
from a snapshot shipped in resources/ (a test keeps it equal to the installed paddlenlp), so `--help`
and argument errors are answered in well under a second, before paddle is imported.

A user error ends with one line `error: ...` naming the file or argument, and exit status 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
TRAINING_FIELDS_FILE = os.path.join(HERE, "resources", "training_arguments.json")
TRUE = {"true", "1", "yes", "y", "on"}
FALSE = {"false", "0", "no", "n", "off"}


class UserError(Exception):
    """An error in what the user gave us; reported as one line, exit status 2."""


def fail(message: str, status: int = 2) -> "typing.NoReturn":
    """Print one `error:` line to stderr and exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def check_can_create(path: str, what: str) -> None:
    """Cheap check, before any work, that folder `path` exists or can be made: its nearest existing
    ancestor must be a writable folder. Raises UserError naming `what`."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe == os.path.abspath(path):
        if not os.path.isdir(probe):
            raise UserError(f"{what} {path!r} is a file; give a folder")
    elif not os.path.isdir(probe):
        raise UserError(f"{what} {path!r}: can't create it ({probe!r} is a file); choose a writable place")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path!r}: can't create it ({probe!r} is not writable); choose a writable place")


def make_dir(path: str, what: str) -> None:
    """os.makedirs(path, exist_ok=True), or a UserError naming `what` and the reason (no traceback)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what} {path!r}: can't create it ({e.strerror or type(e).__name__}); choose a writable place") from None


def require_at_least(values: Dict[str, Any], minimum: int = 1) -> None:
    """Raise UserError naming the first argument below `minimum` (None means "not set" and passes)."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise UserError(f"--{name} must be at least {minimum}, got {value}")


def check_sampling(top_k: int = 1, top_p: float = 1.0, temperature: float = 1.0, repetition_penalty: float = 1.0) -> None:
    """Raise UserError naming the first sampling setting out of range and its value (predict, the server
    and fine-tuning's generation evaluation check their arguments with this, so all say the same)."""
    for name, value, ok, need in (("top_k", top_k, top_k >= 0, ">= 0 (0 = no top-k limit)"), ("top_p", top_p, 0.0 < top_p <= 1.0, "in (0, 1]"),
                                  ("temperature", temperature, temperature >= 0, ">= 0 (0 = greedy)"),
                                  ("repetition_penalty", repetition_penalty, repetition_penalty > 0, "> 0")):
        if not ok:  # (a NaN fails every comparison, so it lands here too)
            raise UserError(f"--{name} must be {need}, got {value}")


# --------------------------------------------------------------------------- field specs
@dataclasses.dataclass
class FieldSpec:
    name: str
    kind: str  # bool int float str list json
    optional: bool
    default: Any
    help: str
    group: str
    choices: Optional[List[str]] = None


def _kind_of(tp) -> Tuple[str, bool, Optional[List[str]]]:
    """(kind, optional, choices) of a type annotation."""
    optional = False
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else str
        origin = typing.get_origin(tp)
    if tp is bool:
        return "bool", optional, None
    if tp is int:
        return "int", optional, None
    if tp is float:
        return "float", optional, None
    if origin in (list, List):
        inner = typing.get_args(tp)
        return ("list" if inner and inner[0] in (str, int, float) else "json"), optional, None
    if origin in (dict, Dict):
        return "json", optional, None
    if isinstance(tp, type) and issubclass(tp, __import__("enum").Enum):
        return "str", optional, [m.value for m in tp]
    return "str", optional, None


def dataclass_specs(cls, group: Optional[str] = None) -> List[FieldSpec]:
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind, optional, choices = _kind_of(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        if hasattr(default, "value"):  # enum default
            default = default.value
        specs.append(
            FieldSpec(f.name, kind, optional, default, str(f.metadata.get("help", "")), group or cls.__name__, choices or f.metadata.get("choices"))
        )
    return specs


def training_fields_snapshot() -> List[Dict[str, Any]]:
    """The field list of the installed paddlenlp TrainingArguments (imports paddlenlp: slow)."""
    from paddlenlp.trainer import TrainingArguments

    out = []
    for s in dataclass_specs(TrainingArguments, "TrainingArguments"):
        default = s.default
        try:
            json.dumps(default)
        except TypeError:
            default = str(default)
        out.append(dict(name=s.name, kind=s.kind, optional=s.optional, default=default, help=s.help, choices=s.choices))
    return out


def training_specs() -> List[FieldSpec]:
    with open(TRAINING_FIELDS_FILE, encoding="utf-8") as f:
        rows = json.load(f)
    return [FieldSpec(group="TrainingArguments", **r) for r in rows]


# --------------------------------------------------------------------------- value conversion
def convert(spec: FieldSpec, value: Any, where: str) -> Any:
    """Convert a JSON value or a command-line string to the field's type, or raise UserError naming `where`."""
    from_cli = isinstance(value, str) and spec.kind != "str"
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and spec.optional):
        if spec.optional or spec.kind == "str":
            return None
        raise UserError(f"{where}: {spec.name} needs a {spec.kind} value, got null")
    try:
        if spec.kind == "bool":
            if isinstance(value, bool):
                return value
            if type(value) is int and value in (0, 1):  # PaddleNLP's JSON files write flags as 0/1
                return bool(value)
            if isinstance(value, str) and value.lower() in TRUE | FALSE:
                return value.lower() in TRUE
            raise ValueError
        if spec.kind == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(value) if isinstance(value, int) or from_cli else _bad()
        if spec.kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value) if isinstance(value, (int, float)) or from_cli else _bad()
        if spec.kind == "list":
            if isinstance(value, list):
                return value
            if isinstance(value, str):
                return [v for v in value.replace(",", " ").split() if v]
            raise ValueError
        if spec.kind == "json":
            return json.loads(value) if isinstance(value, str) else value
        # str
        if isinstance(value, (dict, list)):
            raise ValueError
        value = str(value) if not isinstance(value, bool) else str(value).lower()
    except (ValueError, TypeError, json.JSONDecodeError):
        raise UserError(f"{where}: {spec.name} must be {_kind_words(spec)}, got {json.dumps(value)}") from None
    if spec.choices and value not in spec.choices:
        raise UserError(f"{where}: {spec.name} must be one of {', '.join(map(str, spec.choices))}, got {value!r}")
    return value


def _bad():
    raise ValueError


def _kind_words(spec: FieldSpec) -> str:
    return {"bool": "true or false", "int": "an integer", "float": "a number", "list": "a list", "json": "JSON"}.get(spec.kind, "a string")


# --------------------------------------------------------------------------- parsing
def load_json_args(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such argument file")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is fine
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save the file as UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the argument file must hold a JSON object of name: value pairs")
    return data


def split_cli(argv: Sequence[str], specs: Dict[str, FieldSpec]) -> Dict[str, Any]:
    """`--key value` / `--key=value` / bare `--flag` pairs -> raw values (strings, or True for bare flags)."""
    out: Dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            raise UserError(f"unexpected argument {tok!r}: arguments are --name value pairs after an optional JSON file")
        key, eq, val = tok[2:].partition("=")
        key = key.replace("-", "_") if key.replace("-", "_") in specs else key
        if key not in specs:
            raise UserError(f"unknown argument --{key}{_suggest(key, specs)}")
        if eq:
            out[key] = val
            i += 1
        elif specs[key].kind == "bool" and (i + 1 == len(argv) or argv[i + 1].lower() not in TRUE | FALSE):
            out[key] = True
            i += 1
        elif i + 1 < len(argv):
            out[key] = argv[i + 1]
            i += 2
        else:
            raise UserError(f"--{key} needs a value")
    return out


def _suggest(key: str, specs) -> str:
    close = difflib.get_close_matches(key, list(specs), n=1)
    return f" (did you mean --{close[0]}?)" if close else " (see --help)"


def format_help(prog: str, description: str, groups: List[Tuple[str, List[FieldSpec]]]) -> str:
    lines = [f"usage: {prog} [ARGS.json] [--name value ...]", "", description, "",
             "Values come from the JSON file, then from --name value overrides (booleans: --flag, --flag true, --flag false)."]
    for title, specs in groups:
        lines += ["", f"{title}:"]
        for s in specs:
            default = "" if s.default is None else f" (default: {json.dumps(s.default) if not isinstance(s.default, str) else s.default})"
            choices = f" [{', '.join(map(str, s.choices))}]" if s.choices else ""
            lines.append(f"  --{s.name} {s.kind.upper()}{choices}{default}")
            if s.help:
                lines.append(f"      {' '.join(s.help.split())}")
    return "\n".join(lines)


def parse_args(classes: Sequence[type], argv: Optional[Sequence[str]] = None, prog: str = "", description: str = "",
               training: bool = False, json_file_ok: bool = True, help_only: Sequence[Tuple[str, type]] = ()):
    """Parse argv into one instance per dataclass in `classes` (+ a dict of TrainingArguments kwargs when
    `training`). Exits with a one-line error on bad input and with the help text on -h/--help.
    help_only: (title, dataclass) groups --help lists too, for arguments the command hands over to another
    command (finetune_generation.py with do_ptq / do_gptq runs quantization, as PaddleNLP's script did)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    groups = [(c.__name__, dataclass_specs(c)) for c in classes]
    if training:
        groups.append(("TrainingArguments (PaddleNLP, passed through)", training_specs()))
    specs: Dict[str, FieldSpec] = {}
    for _, gs in groups:
        for s in gs:
            specs.setdefault(s.name, s)
    if "-h" in argv or "--help" in argv:
        extra = [(title, dataclass_specs(cls)) for title, cls in help_only]
        print(format_help(prog or os.path.basename(sys.argv[0]), description, groups + extra))
        sys.exit(0)
    try:
        values: Dict[str, Any] = {}
        source: Dict[str, str] = {}
        if argv and not argv[0].startswith("--") and json_file_ok:
            path = argv.pop(0)
            if not path.endswith(".json"):
                raise UserError(f"unexpected argument {path!r}: the first argument may be a JSON argument file (*.json)")
            for key, val in load_json_args(path).items():
                if key not in specs:
                    raise UserError(f"{path}: unknown argument {key!r}{_suggest(key, specs)}")
                values[key] = val
                source[key] = path
        for key, val in split_cli(argv, specs).items():
            values[key] = val
            source[key] = f"--{key}"
        converted = {k: convert(specs[k], v, source[k]) for k, v in values.items()}
    except UserError as e:
        fail(str(e))
    out = []
    for cls, (_, gs) in zip(classes, groups):
        names = {s.name for s in gs}
        try:
            out.append(cls(**{k: v for k, v in converted.items() if k in names}))
        except (ValueError, TypeError) as e:
            fail(str(e))
    if training:
        out.append({k: v for k, v in converted.items() if k in {s.name for s in groups[-1][1]}})
    return tuple(out)


def dump_args(*objs) -> Dict[str, Any]:
    """A JSON-serialisable dict of dataclass instances / dicts (for saving resolved arguments)."""
    merged: Dict[str, Any] = {}
    for o in objs:
        d = dataclasses.asdict(o) if dataclasses.is_dataclass(o) and not isinstance(o, type) else dict(o)
        for k, v in d.items():
            try:
                json.dumps(v)
            except TypeError:
                v = str(v)
            merged[k] = v
    return merged


if __name__ == "__main__":  # regenerate the TrainingArguments snapshot: python -m paddlellm.arguments
    with open(TRAINING_FIELDS_FILE, "w", encoding="utf-8") as f:
        json.dump(training_fields_snapshot(), f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {TRAINING_FIELDS_FILE}")
