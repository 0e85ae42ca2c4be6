"""A :class:`Flow`, the result of :func:`llama_attrib.flow`, and its views: plots, and the HTML
``[layer x source]`` grid whose rows open the layer's ``[head x source]`` rows (heads, then the
MLP). Inline CSS and JS only."""

from __future__ import annotations

import html
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import require
from .views import colour, visible


@dataclass
class Flow:
    """One logit split over ``[sources, layers, heads + 1]`` (the heads, then the MLP).

    ``scores``: that split (float32, logit units); ``embedding [sources]``: the embeddings'
    direct path (only the token at ``position`` has one); ``bias [layers, heads + 1]``: what
    belongs to no token (zero without biases); ``stream [layers + 1, sources]``: the residual
    stream at ``position`` before the first layer and after each layer, read through the final
    norm and head (how each token's contribution builds up); ``logit``: the real logit (before
    a final soft-cap), which ``scores.sum() + embedding.sum() + bias.sum() + final_bias``
    equals; ``final_bias``: the final norm's bias read by the head (a LayerNorm's; else 0).
    """

    scores: Tensor
    embedding: Tensor
    bias: Tensor
    stream: Tensor
    stream_bias: Tensor
    logit: float
    target: Any
    position: int
    labels: list[str] = field(default_factory=list)
    final_bias: float = 0.0

    @property
    def layers(self) -> int:
        return int(self.scores.shape[1])

    @property
    def heads(self) -> int:
        return int(self.scores.shape[2]) - 1

    def by_layer(self) -> Tensor:
        """``[layers, sources]``: each layer's attention and MLP together."""
        return self.scores.sum(-1).T

    def by_part(self) -> Tensor:
        """``[layers, heads + 1]``: each head's and MLP's direct contribution, all sources."""
        return self.scores.sum(0)

    def grouped(self, groups: Sequence[Sequence[int]], labels: Sequence[str] | None = None) -> Flow:
        """Sources summed over ``groups`` of token positions (every position in one group)."""
        n = self.scores.shape[0]
        members = torch.zeros((len(groups), n))
        for g, positions in enumerate(groups):
            members[g, list(positions)] = 1.0
        if bool((members.sum(0) != 1).any()):
            raise ValueError(f"groups must cover each of the {n} sources exactly once")
        if labels is None:
            labels = ["".join(self.labels[i] for i in g) if self.labels else str(list(g)) for g in groups]
        scores = torch.einsum("gs,slp->glp", members, self.scores)
        return replace(
            self,
            scores=scores,
            embedding=members @ self.embedding,
            stream=self.stream @ members.T,
            labels=list(labels),
        )

    def only(self, sources: Sequence[int]) -> Flow:
        """The same split restricted to some sources (for a view: the totals no longer add up
        to the logit), e.g. without the first token's attention sink."""
        index = torch.tensor(list(sources), dtype=torch.long)
        return replace(
            self,
            scores=self.scores[index],
            embedding=self.embedding[index],
            stream=self.stream[:, index],
            labels=[self.labels[i] for i in index.tolist()] if self.labels else [],
        )

    def top_paths(self, k: int = 10) -> list[tuple[str, int, str, float]]:
        """The ``k`` largest ``(source, layer, part, score)`` paths by absolute score."""
        flat = self.scores.flatten()
        order = flat.abs().argsort(descending=True)[:k]
        out = []
        for index in order.tolist():
            s, rest = divmod(index, self.scores.shape[1] * self.scores.shape[2])
            layer, part = divmod(rest, self.scores.shape[2])
            name = "mlp" if part == self.heads else f"head {part}"
            out.append((self._label(s), layer, name, float(flat[index])))
        return out

    def table(self, k: int = 10) -> str:
        bias = float(self.bias.sum()) + self.final_bias
        total = float(self.scores.sum() + self.embedding.sum()) + bias
        lines = [
            f"logit {self.logit:.4f} = paths {float(self.scores.sum()):.4f} + embeddings "
            f"{float(self.embedding.sum()):.4f} + bias {bias:.4f} ({total:.4f})",
            f"{'source':>16}  {'layer':>5}  {'part':>7}  {'score':>9}",
        ]
        for source, layer, part, score in self.top_paths(k):
            lines.append(f"{source!r:>16}  {layer:5d}  {part:>7}  {score:+9.4f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _label(self, s: int) -> str:
        return self.labels[s] if self.labels else str(s)

    def plot_layers(self, ax: Any = None, cmap: str = "RdBu_r") -> Any:
        """Heatmap ``[layer x source]`` (each layer's heads and MLP together)."""
        return self._heatmap(self.by_layer().numpy(), [f"layer {i}" for i in range(self.layers)], ax, cmap)

    def plot_heads(self, layer: int, ax: Any = None, cmap: str = "RdBu_r") -> Any:
        """Heatmap ``[head x source]`` of one layer (its MLP as the last row)."""
        rows = [f"head {h}" for h in range(self.heads)] + ["mlp"]
        return self._heatmap(self.scores[:, layer].T.numpy(), rows, ax, cmap, title=f"layer {layer}")

    def _heatmap(self, values: np.ndarray, rows: list[str], ax: Any, cmap: str, title: str = "") -> Any:
        require("matplotlib", "viz", "Flow plots")
        import matplotlib.pyplot as plt

        if ax is None:
            width = min(max(4.0, 0.28 * values.shape[1] + 2.0), 40.0)
            _, ax = plt.subplots(figsize=(width, max(2.5, 0.25 * values.shape[0] + 1.5)))
        vmax = float(np.abs(values).max()) or 1.0
        image = ax.imshow(values, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_xticks(range(values.shape[1]))
        ax.set_xticklabels(
            [visible(self._label(s))[:16] for s in range(values.shape[1])], rotation=90, fontsize=8
        )
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(rows, fontsize=8)
        ax.set_xlabel("source")
        if title:
            ax.set_title(title)
        ax.figure.colorbar(image, ax=ax, label="direct contribution (logit)")
        return ax

    def to_html(self, path: str | None = None) -> str:
        """A self-contained page: the ``[layer x source]`` grid; clicking a layer shows its
        ``[head x source]`` rows (the heads, then the MLP)."""
        html = render(self)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(html)
        return html

    def _repr_html_(self) -> str:
        return render(self, full_page=False)


STYLE = """
.la-flow{font-family:system-ui,sans-serif;font-size:12px;color:#222}
.la-flow table{border-collapse:collapse}
.la-flow td{width:12px;height:14px;padding:0;border:1px solid #fff}
.la-flow td.la-fl-label{width:auto;padding-right:8px;white-space:nowrap;border:none}
.la-flow tr.la-fl-layer{cursor:pointer}
.la-flow tr.la-fl-layer td.la-fl-label{font-weight:600}
.la-flow tr.la-fl-part{display:none}
.la-flow tr.la-fl-part.la-open{display:table-row}
.la-flow th{font-weight:400;writing-mode:vertical-rl;transform:rotate(180deg);font-size:10px;
  padding:2px 0;text-align:left;max-height:9em;overflow:hidden}
"""

SCRIPT = """function(uid){
  var root=document.getElementById(uid);
  root.querySelectorAll('tr.la-fl-layer').forEach(function(row){
    row.addEventListener('click',function(){
      var layer=row.getAttribute('data-layer');
      root.querySelectorAll('tr.la-fl-part[data-layer="'+layer+'"]').forEach(function(r){
        r.classList.toggle('la-open');
      });
    });
  });
}"""


def _row(cls: str, layer: int, label: str, values: np.ndarray, vmax: float, sources: list[str]) -> str:
    cells = "".join(
        f'<td style="background:{colour(float(v), vmax)}" '
        f'title="{html.escape(f"{sources[i]!r}: {float(v):+.4g}", quote=True)}"></td>'
        for i, v in enumerate(values)
    )
    name = f'<td class="la-fl-label">{html.escape(label)}</td>'
    return f'<tr class="{cls}" data-layer="{layer}">{name}{cells}</tr>'


def render(result: Flow, full_page: bool = True) -> str:
    scores = result.scores.numpy()
    sources = [result._label(s) for s in range(scores.shape[0])]
    vmax = float(np.abs(scores.sum(-1)).max()) or 1.0
    head = "".join(f"<th>{html.escape(visible(s)[:14])}</th>" for s in sources)
    rows = [f"<tr><td></td>{head}</tr>"]
    rows.append(_row("la-fl-embed", -1, "embedding", result.embedding.numpy(), vmax, sources))
    for layer in range(result.layers):
        rows.append(_row("la-fl-layer", layer, f"▸ layer {layer}", scores[:, layer].sum(-1), vmax, sources))
        for part in range(result.heads + 1):
            name = "mlp" if part == result.heads else f"head {part}"
            rows.append(_row("la-fl-part", layer, f"    {name}", scores[:, layer, part], vmax, sources))
    uid = "la-flow-" + uuid.uuid4().hex[:12]
    body = (
        f'<div class="la-flow" id="{uid}"><style>{STYLE}</style>'
        f"<div>logit {result.logit:.4f} of target {html.escape(repr(result.target))} at position "
        f"{result.position}: each cell is a source token's direct contribution through one layer "
        "(click a layer for its heads and MLP); red raises the logit, blue lowers it.</div>"
        f"<table>{''.join(rows)}</table><script>({SCRIPT})('{uid}');</script></div>"
    )
    if not full_page:
        return body
    head = '<head><meta charset="utf-8"><title>llama_attrib flow</title></head>'
    return f"<!DOCTYPE html>\n<html>{head}<body>{body}</body></html>\n"
