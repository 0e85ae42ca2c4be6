"""Evidence beside each citation: the answer's log-probability with a source removed.

:meth:`~llama_attrib.scores.Scores.ranking` with ``verify=m`` takes the decomposition's ``m``
largest sources, removes each one's tokens from the prompt in turn (one batched forward of the
stock model, left-padded), measures the drop of the answer's log-probability (summed over its
tokens, the quantity ContextCite's metric reads), re-ranks the candidates by that drop and
reports both numbers. A source whose removal does not lower the answer's log-probability is not
evidence for it: :attr:`Citation.supported` is False.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch

from .errors import UnsupportedOptionError
from .families import input_device


class Citation(NamedTuple):
    """A ranked source: its label, its summed score and share (the decomposition's), and the
    drop of the answer's log-probability when its tokens are removed (nats; measured)."""

    label: str
    score: float
    share: float
    drop: float

    @property
    def supported(self) -> bool:
        return self.drop > 0


class Citations(list[Citation]):
    """The verified ranking, largest measured drop first; ``together``: the drop when all of
    them are removed at once."""

    together: float = 0.0


@torch.no_grad()
def answer_logprob(
    model: Any,
    token_ids: Sequence[int],
    prompt_length: int,
    removals: Iterable[Iterable[int]],
    batch: int = 8,
) -> list[float]:
    """``log p(answer | prompt)`` summed over the answer's tokens (every token after
    ``prompt_length``), with the prompt positions of each removal left out: one value per
    removal (an empty one: the prompt as it is)."""
    answer = list(token_ids[prompt_length:])
    if not answer:
        raise UnsupportedOptionError("verify needs an answer: the result has no generated token")
    rows = []
    for removed in removals:
        gone = set(removed)
        if any(i >= prompt_length for i in gone):
            raise ValueError("verify removes prompt tokens only, not the answer's")
        rows.append([t for i, t in enumerate(token_ids) if i not in gone])
    device, out = input_device(model), []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        width = max(len(r) for r in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, r in enumerate(chunk):  # left padding: every answer ends at the last position
            ids[b, width - len(r) :] = torch.tensor(r)
            mask[b, width - len(r) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)
        ).logits
        g = len(answer)
        steps = torch.log_softmax(logits[:, width - g - 1 : width - 1].float(), dim=-1)
        target = torch.tensor(answer, device=steps.device).expand(len(chunk), g)
        out += steps.gather(-1, target[..., None])[..., 0].sum(-1).tolist()
    return out


def verified(
    view: Any, model: Any, ranked: list[tuple[str, float, float]], k: int | None, m: int
) -> Citations:
    """The ``m`` first of ``ranked`` re-ranked by their measured drop; the ``k`` first kept."""
    if model is None:
        raise UnsupportedOptionError("ranking(verify=m) measures with the model: pass model=model")
    candidates = ranked[:m]
    columns = {label: view.columns[view.sources.index(label)] for label, _, _ in candidates}
    p = view.prompt_length
    removals = [[i for i in columns[label] if i < p] for label, _, _ in candidates]
    full, *without = answer_logprob(model, view.token_ids, p, [[], *removals])
    found = [
        Citation(label, score, share, full - w)
        for (label, score, share), w in zip(candidates, without, strict=True)
    ]
    found.sort(key=lambda c: -c.drop)
    out = Citations(found if k is None else found[:k])
    if out:
        together = sorted({i for c in out for i in columns[c.label] if i < p})
        out.together = full - answer_logprob(model, view.token_ids, p, [together])[0]
    return out
