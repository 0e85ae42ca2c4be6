"""The HTML view of a :class:`~llama_attrib.flow.Flow`: a ``[layer x source]`` grid whose rows
open the layer's ``[head x source]`` rows (heads, then the MLP). Inline CSS and JS only."""

from __future__ import annotations

import html
import uuid
from typing import TYPE_CHECKING

import numpy as np

from .views import _colour, visible

if TYPE_CHECKING:
    from .flow import Flow

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
        f'<td style="background:{_colour(float(v), vmax)}" '
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
