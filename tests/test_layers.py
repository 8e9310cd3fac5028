"""The package's imports go one way (setup.cfg's import-linter contracts), and the check can fail."""
import os
import shutil
import subprocess
import sys

from conftest import ROOT

LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def lint(cwd):
    # lint-imports reads setup.cfg in cwd and imports the package found on sys.path (cwd first).
    env = dict(os.environ, PYTHONPATH=cwd)
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_contracts_kept():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in proc.stdout


def test_an_upward_import_breaks_the_contracts(tmp_path):
    """A copy of the package where the registry imports the loader (an upward import, and a circle)."""
    shutil.copytree(os.path.join(ROOT, "paddlellm"), tmp_path / "paddlellm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "setup.cfg"), tmp_path / "setup.cfg")
    base = tmp_path / "paddlellm" / "families" / "base.py"
    text = base.read_text()
    base.write_text(text.replace("import numpy as np\n", "import numpy as np\n\n\ndef _meta(path):\n"
                                 "    from ..loading import read_meta  # a lazy import inside a function counts too\n\n"
                                 "    return read_meta(path)\n", 1))
    proc = lint(str(tmp_path))
    assert proc.returncode != 0
    assert "paddlellm.families.base -> paddlellm.loading" in proc.stdout
    assert "Contracts: 1 kept, 2 broken." in proc.stdout


def test_readme_layout_table_matches_the_tree():
    """Every module and subpackage of paddlellm/ is placed in the README's layer table, and the table names
    only what exists (packages as `name/`, their modules in parentheses after them)."""
    import re

    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| layer") and "---" not in line]
    listed, members = set(), {}
    for row in rows:
        cell = row.split("|")[2]
        for pkg, inner in re.findall(r"`(\w+)/`(?: \(([^)]*)\))?", cell):
            listed.add(pkg)
            members[pkg] = set(re.findall(r"`(\w+)`", inner or ""))
        listed |= set(re.findall(r"`(\w+)`(?!/)", re.sub(r"\([^)]*\)", "", cell)))
    pkg_dir = os.path.join(ROOT, "paddlellm")
    tree = {n[:-3] if n.endswith(".py") else n for n in os.listdir(pkg_dir)
            if (n.endswith(".py") and n != "__init__.py") or os.path.isfile(os.path.join(pkg_dir, n, "__init__.py"))}
    assert listed == tree
    # ... and in setup.cfg's layers contract (import-linter leaves a module it is not told about unchecked)
    cfg = open(os.path.join(ROOT, "setup.cfg"), encoding="utf-8").read()
    layers = cfg.split("type = layers", 1)[1].split("[importlinter:", 1)[0]
    assert set(re.findall(r"paddlellm\.(\w+)", layers)) == tree
    for pkg, names in members.items():
        files = {n[:-3] for n in os.listdir(os.path.join(pkg_dir, pkg)) if n.endswith(".py") and not n.startswith("__")}
        if pkg in ("commands", "formats", "quant"):  # listed in full; serve/ and families/ are described, not listed
            assert names == files, pkg
