"""A ``pydec.Composition`` of logits over the vocabulary, computed lazily.

A full Composition of one position's logits holds ``components x vocab`` numbers (for a
300-token sequence and a 49k vocabulary, 59 MB per generated token). The LM head is linear,
so it is enough to keep the decomposed final hidden state ``[C, *batch, hidden]`` and the
head's weight: ``c[token]`` costs one dot product per component, ``c.recovery`` one
vector-matrix product, and only ``c.components`` materialises the full tensor.
"""

from __future__ import annotations

from typing import Any

import pydec
import torch
from torch import Tensor

from .targets import Contrast, Head, LogProb, Target

# What belongs to no token, by name, in the order target mode's contributions end with them:
# the biases (of linear maps and LayerNorms), what quantized kernels round beyond their
# dequantized linear maps (LLM.int8's activations; zero for an unquantized model), and what a
# rule set that credits queries and keys passes to no input (its softmax's linearisation
# loses it; zero under the exact rules).
SHARES = ("bias", "rounding", "unassigned")


class Contributions(pydec.Composition):  # type: ignore[misc]
    """One logit's (or a batch row's) components, as ``c[token]`` returns them.

    A ``pydec.Composition`` whose ``residual`` (what belongs to no token) is split by name in
    ``shares`` (:data:`SHARES`: ``"bias"``, ``"rounding"``, ``"unassigned"``), with a working ``repr`` (pydec
    0.3.0's own repr calls ``Tensor.has_names``, which torch 2.13 no longer has).
    """

    shares: dict[str, Tensor]

    @staticmethod
    def of(components: Tensor, residual: Tensor | None = None, shares: Tensor | None = None) -> Contributions:
        """``residual``: the share of no token (biases), zero by default; or ``shares``
        ``[..., len(SHARES)]``, its parts by name (the residual is their sum)."""
        zero = components.new_zeros(components.shape[1:])
        if shares is not None:
            shares = shares.to(components)
            residual = shares.sum(-1)
        out = Contributions(
            components, zero if residual is None else residual.to(components).reshape(zero.shape)
        )
        if shares is None:
            out.shares = {name: out.residual if name == "bias" else zero for name in SHARES}
        else:
            out.shares = {name: shares[..., i].reshape(zero.shape) for i, name in enumerate(SHARES)}
        return out

    @staticmethod
    def shares_of(c: pydec.Composition) -> Tensor:
        """``[..., len(SHARES)]``: a Composition's shares of no token; a plain pydec
        Composition's residual is its bias share."""
        found = getattr(c, "shares", None)
        if found is None:
            found = {name: c.residual if name == "bias" else torch.zeros_like(c.residual) for name in SHARES}
        return torch.stack([found[name] for name in SHARES], -1)

    def __repr__(self) -> str:  # type: ignore[override]
        comps = self._component_tensor
        return f"Contributions(components={comps.tolist() if comps.numel() <= 16 else tuple(comps.shape)})"


class LazyComposition(pydec.Composition):  # type: ignore[misc]
    """A Composition of logits ``[*batch, vocab]`` whose full tensor is built on first use.

    Subclasses say what they are (``shape``, ``dtype``, ``device``, ``numc``) and how to build
    the components ``[C, *batch, vocab]`` (``_materialise``); pydec's own methods read
    ``_component_tensor`` and ``_residual_tensor``, which appear when first read.
    """

    names: tuple[str, ...] | None = None  # the components' names, when they are groups
    # The token generate produced at this step (one per row for a batch); None outside generate.
    token: int | tuple[int, ...] | None = None
    _full: Tensor | None = None
    _zeros: Tensor | None = None

    def _materialise(self) -> Tensor:
        raise NotImplementedError

    @property  # type: ignore[override]
    def _component_tensor(self) -> Tensor:
        if self._full is None:
            self._full = self._materialise()
        return self._full

    @_component_tensor.setter
    def _component_tensor(self, value: Tensor) -> None:
        self._full = value

    @property  # type: ignore[override]
    def _residual_tensor(self) -> Tensor:
        if self._zeros is None:
            self._zeros = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return self._zeros

    @_residual_tensor.setter
    def _residual_tensor(self, value: Tensor) -> None:
        self._zeros = value

    @property
    def shape(self) -> torch.Size:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def __len__(self) -> int:
        return int(self.shape[0])

    def explain(self, target: Target, row: int = 0) -> Contributions:
        """Components of a one-row :class:`~llama_attrib.targets.Target` at batch row ``row``."""
        raise NotImplementedError

    def contrast(self, a: int, b: int, row: int = 0) -> Contributions:
        """Components of ``logit_a - logit_b``."""
        return self.explain(Contrast(a, b), row)

    def logprob(self, token: int, row: int = 0) -> Contributions:
        """Components of the log-probability target of ``token``: its logit minus the
        probability-weighted mean logit, ``z_t - sum_j p_j z_j`` with the probabilities ``p``
        frozen (an exact linear target; it equals ``log p_t + H(p)``, the log-probability plus
        the entropy of the step's distribution). Refused under a final soft-cap."""
        return self.explain(LogProb(token), row)


def softcapped(logits: Tensor, cap: float) -> Tensor:
    """``tanh(logits / cap) * cap`` in float32: a final soft-cap (Gemma 2)."""
    return torch.tanh(logits.float() / cap) * cap


class LogitComposition(LazyComposition):
    """Logits ``[*batch, vocab]`` as components ``[C, *batch, vocab]`` plus pydec's
    ``residual``: the share of no token (every bias's), zero for a bias-free model.

    ``hidden``: decomposed final hidden state ``[C, *batch, hidden]``; ``weight``: the LM
    head's ``[vocab, hidden]`` weight (shared, not copied); ``logits``: the real logits the
    LM head gave (before a final soft-cap), kept for reference (``recovery`` is the
    components' sum plus the residual). ``softcap``: the model's final soft-cap (Gemma 2),
    None without one.
    """

    def __init__(
        self,
        hidden: Tensor,
        weight: Tensor,
        logits: Tensor,
        residual: Tensor | None = None,
        softcap: float | None = None,
    ) -> None:
        self._hidden = hidden
        self._weight = weight
        self._bias_hidden = residual  # [*batch, hidden] or None
        self.logits = logits
        self.softcap = softcap

    @property
    def capped(self) -> Tensor | None:
        """The logits after the model's final soft-cap, which the components do not add up to
        (they explain the logits before it); None without a soft-cap."""
        return None if self.softcap is None else softcapped(self.logits, self.softcap)

    def _materialise(self) -> Tensor:
        return torch.matmul(self._hidden, self._w())

    def _w(self) -> Tensor:
        """The head weight as ``[hidden, vocab]``, in component precision."""
        return self._row(slice(None)).T

    def _row(self, index: int | slice) -> Tensor:
        return self._weight[index].to(device=self._hidden.device, dtype=self._hidden.dtype)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self._hidden.shape[1:-1], self._weight.shape[0]))

    @property
    def dtype(self) -> torch.dtype:
        return self._hidden.dtype

    @property
    def device(self) -> torch.device:
        return self._hidden.device

    @property
    def hidden(self) -> Tensor:
        """The decomposed final hidden state ``[C, *batch, hidden]`` (after the final norm)."""
        return self._hidden

    @property  # type: ignore[override]
    def _residual_tensor(self) -> Tensor:
        if self._zeros is None:
            if self._bias_hidden is None:
                self._zeros = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            else:
                self._zeros = torch.matmul(self._bias_hidden, self._w())
        return self._zeros

    @_residual_tensor.setter
    def _residual_tensor(self, value: Tensor) -> None:
        self._zeros = value

    @property
    def recovery(self) -> Tensor:
        """Sum of the components and the residual: the logits ``[*batch, vocab]``."""
        total = self._hidden.sum(0)
        if self._bias_hidden is not None:
            total = total + self._bias_hidden
        return torch.matmul(total, self._w())

    def numc(self) -> int:
        return int(self._hidden.shape[0])

    def __getitem__(self, indices: Any) -> pydec.Composition:
        """``c[token]`` (or ``c[row, token]`` for a batch) without building the full tensor."""
        if self._full is not None or pydec.is_c_accessing_enabled():
            return super().__getitem__(indices)
        if not isinstance(indices, tuple):
            indices = (indices,)
        batch_dims = len(self.shape) - 1
        if len(indices) != batch_dims + 1 or any(i is Ellipsis or i is None for i in indices):
            return super().__getitem__(indices)
        token = indices[-1]
        if isinstance(token, Tensor) and token.dim() == 0:
            token = int(token)
        if not isinstance(token, int):
            return super().__getitem__(indices)
        hidden = self._hidden[(slice(None), *indices[:-1])]  # [C, *rest, hidden]
        row = self._row(token)
        residual = None if self._bias_hidden is None else torch.matmul(self._bias_hidden[indices[:-1]], row)
        return Contributions.of(torch.matmul(hidden, row), residual)

    def explain(self, target: Target, row: int = 0) -> Contributions:
        """Components of a one-row target (one dot product per component)."""
        batched = self._hidden.dim() > 2
        logits = self.logits[row] if batched else self.logits
        head = Head(self._weight, self.dtype, self.softcap is not None)
        vector = target.readout(head, logits[None])[0].to(self._hidden.device)
        hidden = self._hidden[:, row] if batched else self._hidden
        bias = self._bias_hidden
        residual = None if bias is None else (bias[row] if batched else bias) @ vector
        return Contributions.of(hidden @ vector, residual)

    def __repr__(self) -> str:  # type: ignore[override]
        return f"LogitComposition(size={tuple(self.shape)}, components={self.numc()}, dtype={self.dtype})"
