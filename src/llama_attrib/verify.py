"""Evidence beside each citation: the answer's log-probability with a source removed.

:meth:`~llama_attrib.scores.Scores.ranking` with ``verify=m`` takes the decomposition's ``m``
largest sources, removes each one's tokens from the prompt in turn, measures the drop of the
answer's log-probability (summed over its tokens, the quantity ContextCite's metric reads),
re-ranks the candidates by that drop and reports both numbers. The stock model runs once over
the whole sequence with its cache; each removal then runs only from the last position it
leaves unchanged, on that cache cropped there (AttriBoT's saving), where the cache can be
cropped (else full forwards, batched and left-padded; one at a time for a state-space hybrid).
A source whose removal does not lower the answer's log-probability is not evidence for it:
:attr:`Citation.supported` is False.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _compat
from .errors import UnsupportedOptionError
from .families import FAMILIES, input_device


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


def _summed(logits: Tensor, answer: Sequence[int]) -> float:
    """The answer's log-probability from ``logits [len(answer), V]`` (the rows that predict it)."""
    steps = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(list(answer), device=steps.device)
    return float(steps.gather(-1, target[:, None])[:, 0].sum())


def _reusing_the_prefix(
    model: Any, token_ids: Sequence[int], answer: Sequence[int], removals: list[set[int]]
) -> list[float] | None:
    """AttriBoT's saving: one forward of the whole sequence with its cache, then for each
    removal only the positions from the last one it leaves unchanged, from that cache cropped
    there (the prefix before the removed tokens is the same computation). None where the
    model's cache cannot be cropped (a state-space layer's), or a removal starts at 0."""
    if any(gone and min(gone) == 0 for gone in removals):
        return None
    device, g = input_device(model), len(answer)
    ids = torch.tensor([list(token_ids)], device=device)
    out = model(input_ids=ids, use_cache=True)
    cache: Any = next((out[k] for k in _compat.CACHE_KEYWORDS if k in out.keys()), None)  # noqa: SIM118
    layers = getattr(cache, "layers", None)
    if type(cache).__name__ != "DynamicCache" or not layers:
        return None  # none, or a hybrid's (a recurrent state cannot be cropped back)
    if any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        return None  # a sliding window's layer no longer holds what it slid past
    found = []
    for gone in removals:
        if not gone:
            found.append(_summed(out.logits[0, -g - 1 : -1], answer))
            continue
        start = min(gone) - 1  # the last position the removal leaves as it was
        rest = [t for i, t in enumerate(token_ids) if i >= start and i not in gone]
        prefix = copy.deepcopy(cache)
        prefix.crop(start - len(token_ids))  # negative: that many positions off the end
        positions = torch.arange(start, start + len(rest), device=device)[None]
        logits = model(
            input_ids=torch.tensor([rest], device=device),
            position_ids=positions,
            use_cache=True,
            **{_compat.cache_keyword(model): prefix},
        ).logits
        found.append(_summed(logits[0, -g - 1 : -1], answer))
    return found


@torch.no_grad()
def answer_logprob(
    model: Any,
    token_ids: Sequence[int],
    prompt_length: int,
    removals: Iterable[Iterable[int]],
    batch: int = 8,
    reuse: bool = True,
) -> list[float]:
    """``log p(answer | prompt)`` summed over the answer's tokens (every token after
    ``prompt_length``), with the prompt positions of each removal left out: one value per
    removal (an empty one: the prompt as it is). ``reuse``: the unchanged prefix before each
    removal is taken from one forward's cache (AttriBoT, Liu et al., ICLR 2025), where the
    model's cache can be cropped; else ``batch`` sequences a forward, left-padded."""
    answer = list(token_ids[prompt_length:])
    if not answer:
        raise UnsupportedOptionError("verify needs an answer: the result has no generated token")
    rows, sets = [], []
    for removed in removals:
        gone = set(removed)
        if any(i >= prompt_length for i in gone):
            raise ValueError("verify removes prompt tokens only, not the answer's")
        rows.append([t for i, t in enumerate(token_ids) if i not in gone])
        sets.append(gone)
    if reuse:
        found = _reusing_the_prefix(model, token_ids, answer, sets)
        if found is not None:
            return found
    device, out = input_device(model), []
    family = FAMILIES.get(type(model).__name__)
    if family is not None and family.mixer is not None:
        # a state-space layer's biases reach its state at padded positions: one row a forward
        batch = 1
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
