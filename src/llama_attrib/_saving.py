"""Saving and exporting an :class:`~llama_attrib.result.Attribution`: JSON, safetensors (never
pickle) and a long pandas DataFrame."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from torch import nn

from .errors import require
from .scores import Scores

S = TypeVar("S", bound=Scores)

FORMAT = "llama_attrib.Attribution/2"
# Format 1 (before the shares of no token were named) saved their sum as "bias", beside
# "rounding" and "unassigned": loading it takes the two back out of "bias".
FORMATS = ("llama_attrib.Attribution/1", FORMAT)


def to_dataframe(self: Scores) -> Any:
    """A long pandas DataFrame: one row per (step, source) that can contribute, and one per
    non-zero share of no token (source -1, labelled by the share's name).

    Columns: step, generated, generated_id, logit, source (column index), label,
    positions (token positions), score (in this view's unit).
    """
    require("pandas", "viz", "to_dataframe()")
    import pandas as pd

    rows, scores = [], self.scores
    for k in range(self.n_generated):
        for j, label in enumerate(self.sources):
            if not np.isnan(scores[k, j]):
                rows.append(
                    (k, self.generated_tokens[k], self.generated_ids[k], float(self.logits[k]), j, label,
                     tuple(self.columns[j]), float(scores[k, j]))
                )  # fmt: skip
        for name, share in self.share_scores.items():
            if share[k] != 0:
                rows.append((k, self.generated_tokens[k], self.generated_ids[k], float(self.logits[k]), -1,
                             name, (), float(share[k])))  # fmt: skip
    names = ["step", "generated", "generated_id", "logit", "source", "label", "positions", "score"]
    return pd.DataFrame(rows, columns=names)


def to_dict(self: Scores) -> dict[str, Any]:
    """JSON-ready: the score rows are ragged (step ``k`` holds its ``P + k`` sources)."""
    p = self.prompt_length
    return {
        "format": FORMAT,
        "tokens": self.tokens,
        "token_ids": self.token_ids,
        "pieces": self.pieces,
        "special": self.special,
        "prompt_length": p,
        "token_scores": [[float(x) for x in row[: p + k]] for k, row in enumerate(self.token_scores)],
        "logits": [float(x) for x in self.logits],
        "bias": [float(x) for x in (self.bias if self.bias is not None else [])],
        "rounding": [float(x) for x in (self.rounding if self.rounding is not None else [])],
        "unassigned": [float(x) for x in (self.unassigned if self.unassigned is not None else [])],
        "options": self.options,
        "versions": self.versions,
        "groups": self.groups,
        "labels": self.labels,
        "unit": self.unit,
        "drop_first": self.drop_first,
    }


def from_dict(cls: type[S], data: Mapping[str, Any]) -> S:
    rows, n = data["token_scores"], len(data["tokens"])
    scores = np.full((len(rows), max(n - 1, 0)), np.nan, dtype=np.float32)
    for k, row in enumerate(rows):
        scores[k, : len(row)] = row
    return _build(cls, data, token_scores=scores)


def _build(cls: type[S], meta: Mapping[str, Any], **arrays: Any) -> S:
    """An Attribution from saved metadata and arrays, of either format."""
    if meta.get("format") not in FORMATS:
        raise ValueError(f"not a saved Attribution (format {meta.get('format')!r}, expected {FORMAT!r})")
    fields = {f.name for f in dataclasses.fields(cls)}
    kept = {k: v for k, v in {**meta, **arrays}.items() if k in fields and v is not None}
    if meta["format"] != FORMAT and kept.get("bias") is not None:
        # format 1's "bias" is the sum of the three shares
        bias = np.asarray(kept["bias"], dtype=np.float64)
        for name in ("rounding", "unassigned"):
            if kept.get(name) is not None and len(kept[name]):
                bias = bias - np.asarray(kept[name], dtype=np.float64)
        kept["bias"] = bias
    return cls(**kept)


def save(self: Scores, path: str | Path) -> Path:
    """Write to ``.json``, or to ``.safetensors`` (scores as tensors, the rest as JSON
    metadata). Never pickle."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        meta = to_dict(self)
        meta.pop("token_scores")
        meta.pop("logits")
        meta.pop("bias")
        assert self.bias is not None
        tensors = {"token_scores": self.token_scores, "logits": self.logits, "bias": self.bias}
        save_file(tensors, str(path), metadata={"attribution": json.dumps(meta)})
    elif path.suffix == ".json":
        path.write_text(json.dumps(to_dict(self), ensure_ascii=False))
    else:
        raise ValueError(f"save: use a .json or .safetensors path, not {path.name!r}")
    return path


def load(cls: type[S], path: str | Path) -> S:
    """Read what :meth:`save` wrote."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads(f.metadata()["attribution"])
            scores, logits = f.get_tensor("token_scores"), f.get_tensor("logits")
            names = set(f.keys())  # safe_open has no __contains__
            bias = f.get_tensor("bias") if "bias" in names else None
        return _build(cls, meta, token_scores=scores, logits=logits, bias=bias)
    return from_dict(cls, json.loads(path.read_text()))


def jsonable(value: Any) -> Any:
    """The value if JSON can hold it, else its repr (a GenerationConfig, a tensor, ...)."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def versions_of(*packages: str) -> dict[str, str]:
    """Each installed package's version ("unknown" where it is not installed)."""
    found = {}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "unknown"
    return found


def versions(model: nn.Module) -> dict[str, str]:
    """What produced a result: the packages' versions, the model's name and dtype."""
    from . import __version__

    found = {"llama_attrib": __version__, "python": platform.python_version()}
    found.update(versions_of("torch", "transformers", "pydec"))
    config = getattr(model, "config", None)
    found["model"] = str(getattr(config, "_name_or_path", "") or type(model).__name__)
    found["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return found


def provenance(argv: list[str] | None = None) -> dict[str, str]:
    """Where a saved measurement comes from: the date (UTC), the commit of the clone the command
    ran in (``-dirty`` when its tracked files had changes), the machine and the command."""
    import datetime
    import os
    import shlex
    import subprocess
    import sys

    import torch

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, check=False, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    argv = sys.argv if argv is None else argv
    commit = git("rev-parse", "--short=7", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpu = next(
                    (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
                )
        except OSError:
            pass
        device = f"{os.cpu_count()}-core CPU ({cpu}), {torch.get_num_threads()} threads"
    packages = ", ".join(f"{k} {v}" for k, v in versions_of("torch", "transformers").items())
    script = argv[0]
    if os.path.isabs(script) and git("rev-parse", "--show-toplevel"):
        script = os.path.relpath(script, git("rev-parse", "--show-toplevel"))
    command = (
        ["python", "-m", "llama_attrib.evaluation"]
        if script.endswith("evaluation/__main__.py")
        else [
            "python",
            script,
        ]
    )
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "commit": commit,
        "machine": f"{device}; {packages}",
        "command": shlex.join([*command, *argv[1:]]),
    }
