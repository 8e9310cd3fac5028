"""A model folder's chat template (transformers' Jinja format), rendered as transformers renders it.

A checkpoint made with transformers may carry the text format its chat model was trained on: a Jinja
template in ``chat_template.jinja`` (transformers 5) or under ``chat_template`` in ``tokenizer_config.json``
(a string, or a list of ``{"name", "template"}`` of which "default" is used). When a folder has one,
fine-tuning data, predict and the server format conversations with it (Family.encode /
generation_prompt delegate here), so the token ids are those of transformers'
``apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``: the template rendered in a
sandboxed Jinja environment (trim_blocks, lstrip_blocks, ``raise_exception``, the tokenizer's special
tokens as variables) and the text tokenized without adding special tokens.

For training, the conversation is rendered one message at a time (P1 = prompt of turn 1, F1 = P1 + reply 1,
P2 = F1 + prompt of turn 2, ...). Each rendering must start with the previous one; the difference between
them is a piece of text that is either a prompt (not supervised) or a reply. A reply piece is supervised
up to and including its first end-of-turn token (a stop token, e.g. ``<|im_end|>``); what the template puts
after it (a newline) belongs to the next prompt's context and is not supervised.

Foundation module: jinja2 only, nothing from paddle; the tokenizer is passed in.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from .arguments import UserError

JINJA_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
NONE = "none"  # --chat_template none: the family's own format
ATTR = "paddlellm_chat_template"  # the attribute a tokenizer carries its ChatTemplate in


def _environment():
    """The Jinja environment transformers compiles chat templates in (its _compile_jinja_template)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %}...{% endgeneration %} (transformers marks assistant text with it): output the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


class ChatTemplate:
    """A compiled chat template. `origin` says where it came from (for messages and metadata)."""

    def __init__(self, text: str, origin: str):
        import jinja2

        self.text = text
        self.origin = origin
        try:
            self._template = _environment().from_string(text)
        except jinja2.exceptions.TemplateError as e:
            raise UserError(f"chat template {origin}: not a valid Jinja template ({type(e).__name__}: {e})") from None

    def render(self, messages: List[dict], add_generation_prompt: bool, tokens: dict) -> str:
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens)
        except jinja2.exceptions.TemplateError as e:
            raise UserError(f"chat template {self.origin}: rendering failed: {e}") from None

    # ------------------------------------------------------------------ conversations
    @staticmethod
    def messages(users: Sequence[str], replies: Sequence[str], system: Optional[str] = None) -> List[dict]:
        out = [{"role": "system", "content": system}] if system else []
        for i, u in enumerate(users):
            out.append({"role": "user", "content": u})
            if i < len(replies):
                out.append({"role": "assistant", "content": replies[i]})
        return out

    def pieces(self, users: Sequence[str], replies: Sequence[str], tokens: dict,
               system: Optional[str] = None) -> List[Tuple[str, bool]]:
        """The rendering of the conversation split into (text, is_reply) pieces, one per message (the system
        message goes with the first prompt). `replies` may be one shorter than `users` (the last prompt then
        ends with the template's generation prompt)."""
        msgs = [{"role": "system", "content": system}] if system else []
        out: List[Tuple[str, bool]] = []
        done = ""
        for i, u in enumerate(users):
            msgs.append({"role": "user", "content": u})
            steps = [(True, False)]
            if i < len(replies):
                steps.append((False, True))
            for gen, is_reply in steps:
                if is_reply:
                    msgs.append({"role": "assistant", "content": replies[i]})
                text = self.render(msgs, gen, tokens)
                if not text.startswith(done):
                    raise UserError(f"chat template {self.origin}: rendering a conversation message by message does not "
                                    f"give texts that extend each other (at message {len(msgs)}), so replies can't be told "
                                    f"apart from prompts; pass --chat_template none or a template file that does")
                out.append((text[len(done):], is_reply))
                done = text
        return out


def special_tokens(tokenizer) -> dict:
    """The template variables transformers passes from the tokenizer (its special tokens)."""
    out = {}
    for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
        v = getattr(tokenizer, k, None)
        out[k] = str(v) if v is not None else None
    out["additional_special_tokens"] = [str(t) for t in (getattr(tokenizer, "additional_special_tokens", None) or [])]
    return out


# --------------------------------------------------------------------------- folders and choices
def _pick(value, where: str) -> Optional[str]:
    """A tokenizer_config.json chat_template: a string, or a list of {name, template} ("default" is used)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        raise UserError(f"{where}: chat_template lists templates {', '.join(map(str, named))} but none named \"default\"; "
                        f"pass --chat_template with a file holding the one to use")
    raise UserError(f"{where}: chat_template must be a string or a list of {{name, template}}, got {type(value).__name__}")


def from_folder(path: str) -> Optional[ChatTemplate]:
    """The chat template of a model folder (chat_template.jinja first, then tokenizer_config.json), or None."""
    if not path or not os.path.isdir(path):
        return None
    jinja = os.path.join(path, JINJA_FILE)
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return ChatTemplate(f.read(), jinja)
    cfg = os.path.join(path, TOKENIZER_CONFIG)
    if os.path.isfile(cfg):
        with open(cfg, encoding="utf-8") as f:
            try:
                text = _pick(json.load(f).get("chat_template"), cfg)
            except json.JSONDecodeError:
                return None  # the tokenizer loader reports a broken file
        if text:
            return ChatTemplate(text, cfg)
    return None


def check_choice(choice: Optional[str], flag: str = "--chat_template") -> None:
    """UserError unless `choice` is empty, "none" or a readable file (cheap; run before loading anything)."""
    if choice and choice != NONE and not os.path.isfile(choice):
        raise UserError(f"{flag} {choice!r}: no such file; give a Jinja chat template file, or none for the family's own format")


def resolve(choice: Optional[str], folder: str) -> Optional[ChatTemplate]:
    """The template a run uses: None/"" = the folder's own (if any), "none" = no template, else the file."""
    if choice == NONE:
        return None
    if choice:
        check_choice(choice)
        with open(choice, encoding="utf-8") as f:
            return ChatTemplate(f.read(), choice)
    return from_folder(folder)


def attach(tokenizer, template: Optional[ChatTemplate]) -> None:
    setattr(tokenizer, ATTR, template)


def of(tokenizer) -> Optional[ChatTemplate]:
    return getattr(tokenizer, ATTR, None)


def save(tokenizer, out: str) -> Optional[str]:
    """Write the tokenizer's template (if it carries one) as out/chat_template.jinja; returns what to record in
    paddlellm_meta.json: the template's origin, or "none"."""
    template = of(tokenizer)
    if template is None:
        return NONE
    with open(os.path.join(out, JINJA_FILE), "w", encoding="utf-8") as f:
        f.write(template.text)
    return template.origin


# --------------------------------------------------------------------------- token ids
def encode_pieces(pieces: Iterable[Tuple[str, bool]], encode: Callable[[str], List[int]], stop_ids: Iterable[int]):
    """[(ids, supervised flags)] per piece: a reply is supervised up to and including its first stop token."""
    stops = set(stop_ids)
    out = []
    for text, is_reply in pieces:
        ids = encode(text) if text else []
        sup = [False] * len(ids)
        if is_reply:
            end = next((k for k, t in enumerate(ids) if t in stops), len(ids) - 1)
            sup[: end + 1] = [True] * (end + 1)
        out.append((ids, sup))
    return out
