"""An :class:`~llama_attrib.result.Attribution` (its :class:`~llama_attrib.scores.Scores`) as
the JSON object the server returns with each choice (``"attribution"``) and the explorer page
draws: the one shape both read."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..composition import SHARES
from ..scores import Scores

BY = ("token", "word", "sentence", "paragraph")


def _number(x: Any) -> float | None:
    value = float(x)
    return None if math.isnan(value) else value


def attribution_json(
    result: Scores, top: int = 5, by: str = "token", document: str | None = None, rank: int = 5
) -> dict[str, Any]:
    """Per generated token: its text, position, logit, its ``top`` sources (text, position,
    score in logit units, share of the row's absolute scores and shares of no token) and those
    shares; every source's score (``scores``, for the page's colours); and, by sentence or
    paragraph (of ``document``, a text inside the prompt, else of the whole prompt), the
    answer's ``rank`` largest sources."""
    if by not in BY:
        raise ValueError(f"by must be one of {', '.join(BY)}, not {by!r}")
    within = result.find(document) if document is not None else None
    view = result.by(by, within) if by != "token" else result.tokens_level()
    shares = view.normalize("share")
    columns = view.columns  # the token positions of each source
    sources = [
        {"text": label, "positions": [int(i) for i in column]}
        for label, column in zip(view.sources, columns, strict=True)
    ]
    tokens = []
    p = result.prompt_length
    for step in range(result.n_generated):
        row, share_row = view.scores[step], shares.scores[step]
        seen = np.flatnonzero(~np.isnan(row))
        order = seen[np.argsort(-np.abs(row[seen]), kind="stable")][:top]
        tokens.append(
            {
                "text": result.tokens[p + step],
                "id": int(result.token_ids[p + step]),
                "position": p + step,
                "logit": float(result.logits[step]),
                "sources": [
                    {
                        "text": sources[j]["text"],
                        "position": sources[j]["positions"][0] if len(sources[j]["positions"]) == 1 else None,
                        "source": int(j),
                        "score": float(row[j]),
                        "share": float(share_row[j]),
                    }
                    for j in order
                ],
                "no_token": {name: float(result.shares[name][step]) for name in SHARES},
                "scores": [_number(x) for x in row],
            }
        )
    out: dict[str, Any] = {
        "rules": result.options.get("generate", {}).get("rules") or result.options.get("rules") or "exact",
        "target": result.options.get("target") or "logit",
        "by": by,
        "prompt_length": p,
        "tokens_text": list(result.tokens),
        "token_ids": [int(i) for i in result.token_ids],
        "sources": sources,
        "tokens": tokens,
    }
    if by in ("sentence", "paragraph"):
        out["ranking"] = [
            {"text": label, "score": score, "share": share} for label, score, share in view.ranking(k=rank)
        ]
        outside = view.outside()  # the template, the question, the sink: apart, not a citation
        out["outside"] = None if outside is None else {"score": outside[1], "share": outside[2]}
    return out
