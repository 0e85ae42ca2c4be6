"""Views of an :class:`~llama_attrib.result.Attribution`: terminal tables, interactive HTML,
a matplotlib heatmap. Called through the result's ``table``, ``to_html``/``_repr_html_``
and ``plot``."""

from __future__ import annotations

import html
import json
import uuid
from typing import Any

import numpy as np

from ._html import SCRIPT, STYLE
from .errors import require
from .scores import Scores


def visible(text: str) -> str:
    """A token's text with its whitespace made visible, for labels: ``␣`` ``↵`` ``⇥``."""
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"


# -- terminal ------------------------------------------------------------------------------
def table(result: Scores, top: int = 0) -> str:
    """The generation, then per step a table ``source  label  score`` (largest first if
    ``top``, else in text order)."""
    unit = "share of |total|" if result.unit == "share" else "logit"
    lines = [
        f"prompt ({result.prompt_length} tokens): {''.join(result.prompt_tokens)!r}",
        f"generated: {result.generation!r}",
        f"scores: {unit}" + (", first token left out" if result.drop_first else ""),
        "",
    ]
    scores = result.scores
    for k in range(result.n_generated):
        raw = result.token_scores[k, : result.prompt_length + k]
        named = [(name, float(share[k])) for name, share in result.shares.items() if share[k]]
        extra = "".join(f" + {name} {value:.4f}" for name, value in named)
        extra += " (no token)" if named else ""
        lines.append(
            f"step {k}: {result.generated_tokens[k]!r}  logit {float(result.logits[k]):.4f} "
            f"= sum of {len(raw)} contributions {float(raw.sum(dtype=np.float64)):.4f}{extra}"
        )
        valid = [j for j in range(scores.shape[1]) if not np.isnan(scores[k, j])]
        if top:
            valid = [c.column for c in result.top_k(top, step=k)[0]]
        width = max([len(repr(result.sources[j])) for j in valid] + [8])
        for j in valid:
            lines.append(f"  {j:5d}  {result.sources[j]!r:>{width}}  {scores[k, j]:+10.4f}")
        in_unit = result.share_scores
        for name, _ in named:
            lines.append(f"  {'-':>5}  {f'({name})':>{width}}  {float(in_unit[name][k]):+10.4f}")
    if _sink_leads(result):
        lines += [
            "",
            "note: the first token takes the largest share at some step. It is an attention sink: "
            "heads with nothing to attend to put their weight there, so it carries much of the logit "
            "without saying anything about the prompt. Set it apart with "
            "result.normalize(drop_first=True) (CLI: --drop-first).",
        ]
    return "\n".join(lines)


def _sink_leads(result: Scores) -> bool:
    """Whether token 0 (shown, not grouped with others) has the largest |score| at some step."""
    if result.drop_first or not result.n_generated or not result.columns or result.columns[0] != [0]:
        return False
    scores = np.nan_to_num(np.abs(result.scores), nan=-1.0)
    return bool((scores.argmax(1) == 0).any())


# -- HTML ----------------------------------------------------------------------------------
def _display(result: Scores) -> tuple[list[list[float | None]], list[str]]:
    """Per step, the score shown on every token (its column's score; None where it has
    none), and every token's hover label (its column's label)."""
    n = len(result.tokens)
    column_of: dict[int, int] = {}
    for j, positions in enumerate(result.columns):
        for i in positions:
            column_of.setdefault(i, j)
    scores = result.scores
    rows = []
    for k in range(result.n_generated):
        row: list[float | None] = []
        for i in range(n):
            col = column_of.get(i)
            value = None if col is None else float(scores[k, col])
            row.append(None if value is None or np.isnan(value) else float(f"{value:.6g}"))
        rows.append(row)
    labels = [result.sources[column_of[i]] if i in column_of else "" for i in range(n)]
    return rows, labels


def _apart(result: Scores) -> list[int]:
    """Token positions coloured but left out of the colour scale: the first token (an attention
    sink, which takes a large part of many logits) and what lies outside the sentences of a
    sentence view (its ``"(rest)"`` column), so that the sources one cites set the scale."""
    rest = [result.columns[j] for j, label in enumerate(result.sources) if label == "(rest)"]
    return sorted({0, *(i for positions in rest for i in positions)})


COLLAPSE_FROM = 300  # tokens: longer texts open with the folding of what scores little on
RANKED = 10  # sources listed for the whole answer


def _answer(result: Scores) -> list[float | None]:
    """Each token's column score summed over every generated step (the ranking's totals)."""
    if not result.n_generated:
        return [None] * len(result.tokens)
    scores = result.scores
    totals = np.nansum(scores, axis=0)
    seen = ~np.all(np.isnan(scores), axis=0)
    out: list[float | None] = [None] * len(result.tokens)
    for j, positions in enumerate(result.columns):
        if seen[j]:
            for i in positions:
                out[i] = float(f"{float(totals[j]):.6g}")
    return out


def _ranking(result: Scores) -> list[dict[str, Any]]:
    """The top sources of the whole answer, with the token positions each covers."""
    if not result.n_generated:
        return []
    where = {label: j for j, label in reversed(list(enumerate(result.sources)))}
    ranked = []
    for label, score, share in result.ranking(k=RANKED):
        ranked.append(
            {"label": label, "score": score, "share": share, "tokens": list(result.columns[where[label]])}
        )
    return ranked


def _citations(result: Scores, cited: Any) -> dict[str, Any] | None:
    """Verified citations (:class:`~llama_attrib.verify.Citations`) for the view: each with its
    share, score, measured drop, whether the drop supports it and its token positions."""
    if cited is None:
        return None
    where = {label: j for j, label in reversed(list(enumerate(result.sources)))}
    rows = [
        {
            "label": c.label,
            "score": c.score,
            "share": c.share,
            "drop": c.drop,
            "supported": c.supported,
            "tokens": list(result.columns[where[c.label]]),
        }
        for c in cited
    ]
    return {"rows": rows, "together": float(cited.together)}


def _token_spans(result: Scores) -> str:
    spans = []
    for i, text in enumerate(result.tokens):
        kind = "la-gen" if i >= result.prompt_length else "la-prompt"
        extra = " la-special" if result.special[i] else ""
        step = f' data-step="{i - result.prompt_length}"' if i >= result.prompt_length else ""
        spans.append(f'<span class="la-tok {kind}{extra}" data-i="{i}"{step}>{html.escape(text)}</span>')
    return "".join(spans)


def colour(value: float, vmax: float) -> str:
    t = min(1.0, abs(value) / vmax) if vmax > 0 else 0.0
    end = (33, 102, 172) if value < 0 else (178, 24, 43)
    r, g, b = (round(255 + (e - 255) * t) for e in end)
    return f"rgb({r},{g},{b})"


def _overview(result: Scores) -> str:
    """The whole generation at a glance: one row per generated token, one cell per source,
    coloured by its score (each row scaled to its own largest); a click selects the step."""
    scores = result.scores
    rows = []
    for k in range(result.n_generated):
        finite = np.abs(scores[k][~np.isnan(scores[k])])
        vmax = float(finite.max()) if finite.size else 0.0
        cells = []
        for j, label in enumerate(result.sources):
            v = scores[k, j]
            if np.isnan(v):
                cells.append('<td style="background:#f2f2f2"></td>')
            else:
                tip = html.escape(f"{label!r}: {v:+.4g}", quote=True)
                cells.append(f'<td style="background:{colour(float(v), vmax)}" title="{tip}"></td>')
        label = html.escape(visible(result.generated_tokens[k])[:16])
        head = f'<tr class="la-ov-row" data-step="{k}"><td class="la-ov-label">{k}: {label}</td>'
        rows.append(head + "".join(cells) + "</tr>")
    return f'<table class="la-overview" title="sources x generated tokens">{"".join(rows)}</table>'


def to_html(result: Scores, full_page: bool = True, citations: Any = None) -> str:
    """Self-contained HTML: the text, where clicking a generated token colours every earlier
    token by its signed contribution (diverging colours, a legend, values on hover).
    ``citations``: what ``result.ranking(k, verify=m, model=model)`` returned; the view then
    lists them, with each one's share and measured drop, in place of the plain ranking (a
    citation whose removal does not lower the answer's log-probability marked unsupported)."""
    rows, labels = _display(result)
    data = {
        "scores": rows,
        "answer": _answer(result),
        "ranking": _ranking(result),
        "citations": _citations(result, citations),
        "apart": _apart(result),
        "collapse": len(result.tokens) > COLLAPSE_FROM,
        "labels": labels,
        "tokens": result.tokens,
        "logits": [float(x) for x in result.logits],
        "shares": [
            {name: float(share[k]) for name, share in result.share_scores.items() if share[k]}
            for k in range(result.n_generated)
        ],
        "prompt_length": result.prompt_length,
        "unit": "share of |total|" if result.unit == "share" else "logit",
    }
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    uid = "la-" + uuid.uuid4().hex[:12]
    note = ", first token left out" if result.drop_first else ""
    body = (
        f'<div class="la-attrib" id="{uid}">'
        f"<style>{STYLE}</style>"
        f'<div class="la-help">Click a generated token (underlined), or a row of the overview '
        f"below, to colour every earlier token by its contribution to that token's logit "
        f"({data['unit']}{note}); <b>whole answer</b> sums them over every generated token and "
        "ranks the sources. The last step is shown first. Long runs of text that score little "
        "are folded into […]: click one to open it.</div>"
        '<div class="la-controls"><button type="button" class="la-answer">whole answer</button>'
        '<label><input type="checkbox" class="la-fold"> fold text that scores little</label></div>'
        f'<div class="la-text">{_token_spans(result)}</div>'
        '<div class="la-legend"><span class="la-min">−</span><span class="la-bar"></span>'
        '<span class="la-max">+</span><span class="la-info">no token selected</span></div>'
        '<ol class="la-ranking" title="sources of the whole answer, largest first"></ol>'
        f"{_overview(result)}"
        f'<script type="application/json" class="la-data">{payload}</script>'
        f'<script>({SCRIPT})("{uid}");</script>'
        "</div>"
    )
    if not full_page:
        return body
    title = html.escape(result.generation.strip()[:60] or "attribution")
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>llama_attrib: {title}</title>'
        f"</head><body>{body}</body></html>\n"
    )


# -- matplotlib ----------------------------------------------------------------------------
def plot(result: Scores, ax: Any = None, cmap: str = "RdBu_r", max_label: int = 16) -> Any:
    """Heatmap ``[generated step, source]``: a diverging colour map centred on 0, NaN (no
    contribution possible) in grey, whitespace made visible in the labels."""
    require("matplotlib", "viz", "plot()")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    scores = result.scores
    if ax is None:
        width = min(max(4.0, 0.28 * scores.shape[1] + 2.0), 40.0)
        _, ax = plt.subplots(figsize=(width, max(2.5, 0.32 * scores.shape[0] + 1.8)))
    finite = np.abs(scores[~np.isnan(scores)])
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    colours = colormaps[cmap].with_extremes(bad="#e6e6e6")
    image = ax.imshow(np.ma.masked_invalid(scores), cmap=colours, vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(scores.shape[1]))
    ax.set_xticklabels([visible(s)[:max_label] for s in result.sources], rotation=90, fontsize=8)
    ax.set_yticks(range(scores.shape[0]))
    ax.set_yticklabels([f"{k}: {visible(t)[:max_label]}" for k, t in enumerate(result.generated_tokens)])
    ax.set_xlabel("source")
    ax.set_ylabel("generated token")
    unit = "share of |total|" if result.unit == "share" else "logit"
    ax.figure.colorbar(image, ax=ax, label=f"contribution ({unit})")
    return ax


__all__ = ["plot", "table", "to_html", "visible"]
