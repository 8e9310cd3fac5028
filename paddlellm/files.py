"""Small file helpers every layer shares: atomic JSON writes, the output-folder metadata file.

Stdlib only: importing it costs nothing (`--help` stays fast).
"""
from __future__ import annotations

import json
import os
from typing import Dict

META_FILE = "paddlellm_meta.json"  # written by our commands into every folder they produce


def read_json(path: str) -> Dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    """Write JSON atomically (a crash never leaves half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    """Write text atomically and durably (fsync before the rename: a journal that must survive a crash)."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def read_meta(path: str) -> Dict:
    """The paddlellm_meta.json of a folder ({} when it has none)."""
    meta_path = os.path.join(path, META_FILE)
    return read_json(meta_path) if os.path.isfile(meta_path) else {}
