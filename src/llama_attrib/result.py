"""``Attribution``: the result of :func:`llama_attrib.attribute`, a plain dataclass: its numbers
and their views (:class:`~llama_attrib.scores.Scores`), saving (:mod:`._saving`), the displays
(:mod:`.views`) and the flow of one step (:mod:`.flow`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import _saving
from .scores import Contributor, Scores, Unit


@dataclass(eq=False)
class Attribution(Scores):
    """Exact per-source contributions to every generated token's logit (the fields and their
    views: :class:`~llama_attrib.scores.Scores`), with saving, displays and the flow of a step."""

    __hash__ = None  # type: ignore[assignment]

    def to_dataframe(self) -> Any:
        """A long pandas DataFrame: one row per (step, source) that can contribute.

        Columns: step, generated, generated_id, logit, source (column index), label,
        positions (token positions), score (in this view's unit).
        """
        return _saving.to_dataframe(self)

    # -- saving (``_saving``) ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the score rows are ragged (step ``k`` holds its ``P + k`` sources)."""
        return _saving.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Attribution:
        return _saving.from_dict(cls, data)

    def save(self, path: str | Path) -> Path:
        """Write to ``.json``, or to ``.safetensors`` (scores as tensors, the rest as JSON
        metadata). Never pickle."""
        return _saving.save(self, path)

    @classmethod
    def load(cls, path: str | Path) -> Attribution:
        """Read what :meth:`save` wrote."""
        return _saving.load(cls, path)

    # -- inside the model ----------------------------------------------------------------
    def flow(self, step: int, model: Any = None) -> Any:
        """Step ``step``'s logit split over source x layer x head/MLP (:func:`llama_attrib.flow`),
        sources labelled by their text. ``model``: the model that produced this result (kept
        by :func:`llama_attrib.attribute` on the result it returns; pass it for a loaded one)."""
        from .flow import flow

        model = model if model is not None else getattr(self, "_model", None)
        if model is None:
            raise ValueError("flow(step) needs the model: result.flow(step, model=model)")
        if not 0 <= step < self.n_generated:
            raise IndexError(f"step {step} out of range ({self.n_generated} generated tokens)")
        end = self.prompt_length + step
        device = next(model.parameters()).device
        ids = torch.tensor([self.token_ids[:end]], device=device)
        return flow(model, ids, target=self.token_ids[end], labels=self.tokens[:end])

    # -- views (llama_attrib.views) ----------------------------------------------------
    def table(self, top: int = 0) -> str:
        """Per-step text tables for a terminal (``top``: only the N largest sources)."""
        from .views import table

        return table(self, top)

    def __str__(self) -> str:
        return self.table(top=10)

    def __repr__(self) -> str:
        view = f", {len(self.columns)} grouped sources" if self.groups is not None else ""
        return (
            f"Attribution(prompt={self.prompt_length} tokens, generated={self.generation!r}, "
            f"unit={self.unit!r}, drop_first={self.drop_first}{view})"
        )

    def to_html(self, path: str | Path | None = None, citations: Any = None) -> str:
        """Self-contained interactive HTML (inline CSS and JS); written to ``path`` if given.
        ``citations``: ``self.ranking(k, verify=m, model=model)``'s result, listed with each
        source's share and measured drop (:func:`llama_attrib.views.to_html`)."""
        from .views import to_html

        html = to_html(self, citations=citations)
        if path is not None:
            Path(path).write_text(html, encoding="utf-8")
        return html

    def explore(self, top: int = 5, by: str = "token", document: str | None = None) -> Any:
        """The explorer page (the one ``llama-attrib serve`` shows at ``/``) with this result:
        click a generated token to colour its sources. ``by``: token, word, sentence or
        paragraph (of ``document``, a text of the prompt). Shows itself in a notebook;
        ``.to_html(path)`` writes it to a file."""
        from .explorer import Explorer

        return Explorer(self, top, by, document)

    def _repr_html_(self) -> str:
        from .views import to_html

        return to_html(self, full_page=False)

    def plot(self, ax: Any = None, **kwargs: Any) -> Any:
        """A matplotlib heatmap ``[generated step, source]``; returns the Axes."""
        from .views import plot

        return plot(self, ax=ax, **kwargs)


__all__ = ["Attribution", "Contributor", "Unit"]
