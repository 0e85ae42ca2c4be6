"""Saved benchmark results: the records a script measured and where they come from.

Every figure in README.md and docs/ is rendered from a file written here
(``scripts/docs_tables.py``; ``tests/test_docs_tables.py`` fails when a table and its file
disagree). A file is ``{"meta": {...}, "records": [...]}``; ``meta`` holds the date, the
commit the code was at (``-dirty`` when the tree had changes), the machine and the command.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """The device the figures were measured on, in words, with the library versions."""
    import torch
    import transformers

    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        device = f"{os.cpu_count()}-core CPU ({_cpu()}), {torch.get_num_threads()} threads"
    return f"{device}; torch {torch.__version__}, transformers {transformers.__version__}"


def meta(argv: list[str] | None = None) -> dict[str, str]:
    """Date (UTC), commit, machine and the command that made the file."""
    argv = sys.argv if argv is None else argv
    script = os.path.relpath(os.path.abspath(argv[0]), ROOT)
    commit = _git("rev-parse", "--short=7", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "commit": commit,
        "machine": machine(),
        "command": shlex.join(["python", script, *argv[1:]]),
    }


def save(path: str | os.PathLike[str], records: list[dict[str, Any]], **extra: Any) -> None:
    """Write ``records`` with :func:`meta` (and ``extra`` fields) to ``path`` as JSON."""
    body = {"meta": meta(), **extra, "records": records}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(body, indent=1) + "\n")
    print(f"saved {len(records)} records to {path}", flush=True)
