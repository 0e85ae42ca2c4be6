"""Saved benchmark results: the records a script measured and where they come from.

Every figure in README.md and docs/ is rendered from a file written here
(``scripts/docs_tables.py``; ``tests/test_docs_tables.py`` fails when a table and its file
disagree). A file is ``{"meta": {...}, "records": [...]}``; ``meta`` holds the date, the
commit the code was at (``-dirty`` when the tree had changes), the machine and the command
(:func:`llama_attrib._saving.provenance`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llama_attrib._saving import provenance


def save(path: str | os.PathLike[str], records: list[dict[str, Any]], **extra: Any) -> None:
    """Write ``records`` with their provenance (and ``extra`` fields) to ``path`` as JSON."""
    body = {"meta": provenance(), **extra, "records": records}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(body, indent=1) + "\n")
    print(f"saved {len(records)} records to {path}", flush=True)
