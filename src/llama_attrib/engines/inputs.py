"""What a decomposition is asked: the teacher-forced inputs and the explained positions
(:class:`Inputs`), the targets of each step, component groups, and a progress bar."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedOptionError
from ..session import Session

MODES = ("target", "forward")

Span = tuple[int, int]
Groups = Mapping[str, Span | Sequence[Span]] | Sequence[Span] | Tensor


@dataclass(frozen=True)
class Inputs:
    """A teacher-forced pass: ids ``[B, T]``, mask, position ids, and the positions explained."""

    ids: Tensor
    mask: Tensor | None
    position_ids: Tensor | None
    positions: list[int]
    last: Tensor | None = None  # right padding: each row's last real position (one step)

    @property
    def first(self) -> int:
        """The first position explained (the last layer's outputs before it are not read)."""
        return self.positions[0] if self.last is None else int(self.last.min())

    def call(self, session: Session) -> Any:
        """The model's own forward over the inputs (its leaves dispatching to the session's
        active pass), keeping the logits from the first explained position."""
        kwargs: dict[str, Any] = {"use_cache": False}
        kwargs["logits_to_keep"] = self.ids.shape[1] - self.first
        if self.mask is not None:
            kwargs["attention_mask"] = self.mask
        if self.position_ids is not None:
            kwargs["position_ids"] = self.position_ids
        return session.plain(input_ids=self.ids, **kwargs)

    @property
    def kept(self) -> Tensor:
        """Index of each explained position among the logits kept."""
        return torch.tensor(self.positions) - self.positions[0]

    def select(self, t: Tensor, dim: int = 0) -> Tensor:
        """``t[..., B, T_kept, ...]`` (batch at ``dim``) -> the explained positions ``[..., B, K, ...]``."""
        if self.last is None:
            return t.index_select(dim + 1, self.kept.to(t.device))
        index = (self.last - int(self.last.min())).to(t.device)
        rows = torch.arange(t.shape[dim], device=t.device)
        moved = t.movedim((dim, dim + 1), (0, 1))[rows, index]  # [B, ...]
        return moved.unsqueeze(1).movedim((0, 1), (dim, dim + 1))


def as_batch(value: Any, name: str) -> Tensor:
    t = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise UnsupportedOptionError(f"{name} must be [T] or [batch, T], got shape {tuple(t.shape)}")
    return t


def token_ids(model: nn.Module, value: Any) -> Tensor:
    """``input_ids`` as ``[batch, T]``, checked before any work: integer ids of the model's
    vocabulary (its input embedding's rows), at least one per row."""
    ids = as_batch(value, "input_ids")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise UnsupportedOptionError(f"input_ids must be integer token ids, not {ids.dtype}: use .long()")
    if ids.shape[1] == 0:
        raise UnsupportedOptionError("input_ids is empty: give at least one token")
    rows = int(model.get_input_embeddings().num_embeddings)  # type: ignore[operator]
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= rows:
        raise UnsupportedOptionError(
            f"input_ids holds {low if low < 0 else high}, outside the model's {rows} token ids"
        )
    return ids


def group_members(groups: Groups, length: int) -> tuple[Tensor, tuple[str, ...]]:
    """``[G, length]`` 0/1 membership and the groups' names (``"other"`` for the rest)."""
    if isinstance(groups, Tensor):
        ids = groups.long().flatten()
        if ids.shape[0] != length:
            raise UnsupportedOptionError(f"groups has {ids.shape[0]} entries for {length} positions")
        labels = sorted(set(ids.tolist()))
        members = torch.stack([(ids == g).float() for g in labels])
        return members, tuple(str(g) for g in labels)
    named: list[tuple[str, list[Span]]] = []
    if isinstance(groups, Mapping):
        for name, spans in groups.items():
            many = spans if spans and isinstance(spans[0], (tuple, list)) else [spans]
            named.append((str(name), [(int(s), int(e)) for s, e in many]))  # type: ignore[misc, arg-type]
    else:
        named = [(str(i), [(int(s), int(e))]) for i, (s, e) in enumerate(groups)]
    members = torch.zeros((len(named), length))
    for g, (name, spans) in enumerate(named):
        for start, end in spans:
            if not 0 <= start < end <= length:
                raise UnsupportedOptionError(
                    f"group {name!r}: span ({start}, {end}) is not inside the {length} positions"
                )
            members[g, start:end] = 1.0
    if bool((members.sum(0) > 1).any()):
        raise UnsupportedOptionError("groups overlap: each position may belong to one group only")
    names = [n for n, _ in named]
    rest = members.sum(0) == 0
    if bool(rest.any()):
        members = torch.cat([members, rest.float()[None]])
        names.append("other")
    return members, tuple(names)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(progress: bool | None, total: int, unit: str, work: int) -> Any:
    """A tqdm bar on stderr when asked, or (``None``) when the run is large enough to wait for."""
    show = progress if progress is not None else (total > 1 and work > 200_000)
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc="llama_attrib", leave=False)


def last_real(mask: Any, length: int) -> Tensor | None:
    """Each row's last attended position, when a 2D mask right-pads some row; else None."""
    if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[-1] != length:
        return None
    if bool(mask[:, -1].all()):
        return None
    return length - 1 - mask.flip(-1).long().argmax(-1)


def positions_from_mask(mask: Tensor) -> Tensor:
    """The position ids a (left-)padded mask implies: real tokens count from 0, pads get 1."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
