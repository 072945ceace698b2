"""The documentation stays true: docs/cli.md is the app's help, and the README's quickstart runs
as written (its ```bash blocks, then its ```python blocks, in a fresh directory and processes)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CLI_DOCS = ROOT / "docs" / "cli.md"
REGENERATE = "python scripts/gen_cli_docs.py"
# what the quickstart needs besides the standard library
QUICKSTART_MODULES = ("torch", "faiss", "numpy", "pandas", "pyarrow", "typer", "safetensors")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs",
                                                  ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_docs_are_current(tmp_path):
    """docs/cli.md is what scripts/gen_cli_docs.py writes from the typer app now."""
    out = tmp_path / "cli.md"
    out.write_text(_generator().render())
    current = CLI_DOCS.read_text() if CLI_DOCS.exists() else ""
    assert out.read_text() == current, (
        f"docs/cli.md does not match the CLI's help: run `{REGENERATE}` and commit docs/cli.md")


def quickstart_blocks(text: str) -> dict[str, list[str]]:
    """The fenced ```bash and ```python blocks of the README's "## Quickstart" section."""
    match = re.search(r"^## Quickstart\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, "README.md has no '## Quickstart' section"
    blocks = {"bash": [], "python": []}
    for lang, body in re.findall(r"^```(bash|python)\n(.*?)^```", match.group(1), re.S | re.M):
        blocks[lang].append(body)
    return blocks


def test_quickstart_blocks_are_found():
    blocks = quickstart_blocks(README.read_text())
    assert blocks["bash"] and blocks["python"]
    assert any("awe train" in b for b in blocks["bash"])
    assert any("from awe import AWE" in b for b in blocks["python"])


@pytest.mark.slow
def test_readme_quickstart_runs(tmp_path):
    """The quickstart as a new user types it: the bash blocks with an `awe` on the PATH that runs
    this checkout's CLI, then the python blocks in one fresh interpreter, in an empty directory."""
    missing = [m for m in QUICKSTART_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the quickstart needs {', '.join(missing)}")
    if shutil.which("bash") is None:
        pytest.skip("the quickstart's shell blocks need bash")
    blocks = quickstart_blocks(README.read_text())
    work = tmp_path / "work"
    work.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "awe"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cli.main "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    script = work / "quickstart.sh"
    script.write_text("set -euo pipefail\n" + "\n".join(blocks["bash"]))
    run = subprocess.run(["bash", str(script)], cwd=work, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"README bash quickstart failed:\n{run.stdout}\n{run.stderr}"
    for wrote in ("quick/model/awe.safetensors", "quick/eval.json", "quick/scored.parquet"):
        assert (work / wrote).exists(), wrote

    program = work / "quickstart.py"
    program.write_text("\n".join(blocks["python"]))
    run = subprocess.run([sys.executable, str(program)], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"README python quickstart failed:\n{run.stdout}\n{run.stderr}"
    assert "P@1" in run.stdout
