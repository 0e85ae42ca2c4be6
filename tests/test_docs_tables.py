"""Every table of figures in README.md and docs/ equals what its saved result file renders
(``scripts/docs_tables.py``), and no table of figures stands outside such a block."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.once  # reads files only: one transformers version is enough


def _tables() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "scripts" / "docs_tables.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_tables"] = module
    spec.loader.exec_module(module)
    return module


tables = _tables()


def test_every_table_equals_its_data() -> None:
    assert tables.differences() == [], "run `python scripts/docs_tables.py` and commit the tables"


@pytest.mark.parametrize("path", tables.DOCS, ids=lambda p: p.name)
def test_no_table_of_figures_stands_outside_a_block(path: Path) -> None:
    assert tables.loose_tables(path) == [], f"{path.name}: give this table a result file and a block"


def test_every_block_names_a_table_and_every_table_is_used() -> None:
    used = {m.group(2) for p in tables.DOCS for m in tables.BLOCK.finditer(p.read_text())}
    assert used <= set(tables.TABLES), used - set(tables.TABLES)
    assert set(tables.TABLES) <= used, f"tables no page shows: {set(tables.TABLES) - used}"


def test_a_changed_figure_or_a_hand_made_table_is_found(tmp_path: Path) -> None:
    """The checks above, seen failing: one figure of a rendered table changed by hand, and a
    table of figures pasted outside its block."""
    page = (ROOT / "docs" / "speed.md").read_text()
    block = next(m.group(0) for m in tables.BLOCK.finditer(page) if m.group(2) == "speed-cpu")
    changed = re.sub(r"\d+\.\d\d s", "9.99 s", block, count=1)
    assert changed != block
    copy = tmp_path / "speed.md"
    copy.write_text(page.replace(block, changed))
    assert tables.differences([copy]) == [f"{copy}: speed-cpu"]
    copy.write_text(page.replace(block, changed.replace("<!-- table: speed-cpu -->\n", "")))
    assert tables.loose_tables(copy) == [
        "| model | prompt + new | mode | time | vs plain | peak memory | vs plain |"
    ]


def test_every_result_file_says_where_it_comes_from() -> None:
    files = [
        *ROOT.glob("benchmarks/*.json"),
        *ROOT.glob("benchmarks/*.jsonl"),
        *ROOT.glob("benchmarks/results/*"),
    ]
    assert len(files) >= 10
    for path in files:
        data = tables.Data(str(path.relative_to(ROOT / "benchmarks")))
        assert {"date", "commit", "machine", "command"} <= set(data.meta), path
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", data.meta["date"]), path
        assert re.fullmatch(r"[0-9a-f]{7}", data.meta["commit"]), f"{path}: measured on a tree with changes"
        assert data.records, path
        json.dumps(data.records)
