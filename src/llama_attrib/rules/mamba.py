"""A Mamba-2 layer (IBM Granite 4.0's hybrids), linear in its input once its selection is frozen.

The stock layer computes, from its input ``h`` (masked at padding)::

    z, xBC, dt = in_proj(h)                       # gate, conv input, time steps
    x, B, C    = act(conv(xBC))                   # causal depthwise convolution, then SiLU
    y_t        = sum_{s <= t} (C_t . B_s) exp(sum_{s < r <= t} dt_r A) dt_s x_s  +  D x_t
    out        = out_proj(norm(y * silu(z)))      # a gated RMSNorm over groups of channels

Frozen from the real input, as attention's probabilities and every gate are: ``dt`` (after
its bias, softplus and limits), ``B`` and ``C``, the activation's ratio ``act(u) / u`` on the
``x`` channels (the identity rule), and ``silu(z)`` times the gated norm's scale. What is
left is linear in the components: ``in_proj``'s ``x`` rows, the convolution (a causal mix
over the last few positions), the state-space mix ``M[t, s] = (C_t . B_s) exp(...) dt_s`` (an
attention matrix that is not normalised, per head), the ``D`` skip and ``out_proj``. The
biases (``in_proj``'s ``x`` rows through the convolution, the convolution's own, and
``out_proj``'s) pass through the same frozen factors into the bias share.

Under the uniform rule (AttnLRP; MambaLRP's rules, Jafari et al., NeurIPS 2024), the gate's
product ``y * silu(z)`` is credited half to each side: through ``y`` with the gate frozen, and
through ``z`` (``in_proj``'s gate rows) with ``y`` frozen and ``silu`` by the identity rule;
the selection stays frozen, as MambaLRP freezes it. Both sides are conservative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _compat
from .linear import Proj
from .mlp import identity_ratio

IN, OUT = Proj("in_proj"), Proj("out_proj")


def _z_rows(layer: Any) -> slice:
    return slice(0, int(layer.intermediate_size))  # in_proj's rows of the gate z


Z_ROWS = Proj("in_proj", _z_rows)


def _x_rows(layer: Any) -> slice:
    inter = int(layer.intermediate_size)
    return slice(inter, 2 * inter)  # in_proj's rows: the gate z, then x (these), B, C and dt


X_ROWS = Proj("in_proj", _x_rows)


@dataclass(frozen=True)
class MambaFrozen:
    """One call's frozen factors: ``ratio [B, T, I]`` (the activation's on the ``x`` channels,
    times the padding mask), ``mix [B, H, T, T]`` (the state-space matrix), ``skip [H]``
    (``D``), ``gate [B, T, I]`` (``silu(z)`` times the gated norm's scale and weight)."""

    ratio: Tensor
    mix: Tensor
    skip: Tensor
    gate: Tensor
    keep: Tensor | None  # the padding mask [B, T, 1], which the layer applies to its input
    # the uniform rule's side through z: ``y * silu(z) / z / 2`` times the norm's scale [B, T, I]
    through_z: Tensor | None = None


def _sizes(layer: Any) -> tuple[int, int, int, int, int]:
    """``(intermediate, groups * state, heads, head_dim, groups)`` of a Mamba-2 layer."""
    groups = int(layer.n_groups)
    return (
        int(layer.intermediate_size),
        groups * int(layer.ssm_state_size),
        int(layer.num_heads),
        int(layer.head_dim),
        groups,
    )


def _conv(layer: Any, x: Tensor, channels: slice, bias: bool) -> Tensor:
    """The causal depthwise convolution of ``x [..., T, c]`` over the given channels."""
    weight = layer.conv1d.weight.detach()[channels].to(x)  # [c, 1, K]
    lead, (t, c) = x.shape[:-2], x.shape[-2:]
    flat = x.reshape(-1, t, c).transpose(1, 2)  # [N, c, T]
    b = layer.conv1d.bias.detach()[channels].to(x) if bias and layer.conv1d.bias is not None else None
    out = F.conv1d(flat, weight, b, padding=weight.shape[-1] - 1, groups=c)[..., :t]
    return out.transpose(1, 2).reshape(*lead, t, c)


class _Selection(NamedTuple):
    """The real side of a call on ``q`` new positions after ``past`` positions: the frozen
    factors (``ratio``, ``mix [B, H, q, S]``, ``skip``, ``y`` before the gate, ``z`` and the
    gated norm's ``post`` scale), the padding ``keep``, the convolution's ``window`` after the
    call (its last ``K - 1`` inputs), and every position's real ``x``, ``b``, ``dt`` and ``cum``
    (for a state)."""

    keep: Tensor
    z: Tensor
    window: Tensor
    ratio: Tensor
    mix: Tensor
    skip: Tensor
    y: Tensor
    post: Tensor
    x: Tensor
    b: Tensor
    dt: Tensor
    cum: Tensor


@torch.no_grad()
def _select(layer: Any, real: Tensor, mask: Tensor | None, past: MambaState | None) -> _Selection:
    """The stock layer's selection on ``real [B, q, hidden]`` after ``past`` (None: a whole
    sequence from its start), in float32, as :meth:`Mamba2.factors` and :func:`forward_step`
    freeze it."""
    inter, gn, heads, hd, groups = _sizes(layer)
    batch, q, _ = real.shape
    k1 = int(layer.conv1d.weight.shape[-1]) - 1
    mask = _compat.mamba_mask(mask)
    keep = torch.ones((batch, q, 1), device=real.device) if mask is None else mask[:, -q:, None].float()
    z, conv_in, dt = (
        IN.affine(layer, real.float() * keep).float().split([inter, inter + 2 * gn, heads], dim=-1)
    )
    window = real.new_zeros((batch, k1, inter + 2 * gn), dtype=torch.float32) if past is None else past.window
    grown = torch.cat([window, conv_in], 1)  # [B, K - 1 + q, conv_dim]
    full = grown.transpose(1, 2)
    bias = None if layer.conv1d.bias is None else layer.conv1d.bias.detach().float()
    u = F.conv1d(full, layer.conv1d.weight.detach().float(), bias, groups=full.shape[1]).transpose(1, 2)
    act: Any = layer.act
    ratio = identity_ratio(act, u[..., :inter]) * keep
    x = act(u[..., :inter]) * keep
    b, c = (act(part) * keep for part in u[..., inter:].split([gn, gn], dim=-1))
    dt = F.softplus(dt + layer.dt_bias.detach().float())
    low, high = layer.time_step_limit or (0.0, float("inf"))
    dt = dt.clamp(min=low, max=high)  # [B, q, H]
    a = -torch.exp(layer.A_log.detach().float())  # [H]
    state = gn // groups
    b = b.view(batch, q, groups, state).repeat_interleave(heads // groups, dim=2)
    c = c.view(batch, q, groups, state).repeat_interleave(heads // groups, dim=2)
    start = torch.zeros((batch, 1, heads), device=real.device) if past is None else past.cum[:, -1:]
    cum = start + torch.cumsum(dt * a, dim=1)
    if past is not None:
        x, b, dt, cum = (
            torch.cat([old, new], 1)
            for old, new in ((past.x, x), (past.b, b), (past.dt, dt), (past.cum, cum))
        )
    old = 0 if past is None else past.length
    s_len = old + q
    seen = (
        torch.arange(s_len, device=real.device)[None, :]
        <= (old + torch.arange(q, device=real.device))[:, None]
    )
    gap = (cum[:, old:].transpose(1, 2)[..., :, None] - cum.transpose(1, 2)[..., None, :]).masked_fill(
        ~seen, -torch.inf
    )
    mix = torch.einsum("bthn,bshn->bhts", c, b) * torch.exp(gap) * dt.transpose(1, 2)[:, :, None, :]
    skip = layer.D.detach().float()
    y = torch.einsum("bhts,bshp->bthp", mix, x.view(batch, s_len, heads, hd))
    y = (y + skip[:, None] * x[:, old:].view(batch, q, heads, hd)).reshape(batch, q, inter)
    norm: Any = layer.norm
    size = int(getattr(norm, "group_size", inter))  # 4.x's gated norm has one group
    grouped = (y * F.silu(z)).view(batch, q, inter // size, size)
    scale = torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + float(norm.variance_epsilon))
    post = scale.expand_as(grouped).reshape(batch, q, inter) * norm.weight.detach().float()
    window = grown[:, grown.shape[1] - k1 :]
    return _Selection(keep, z, window, ratio, mix, skip, y, post, x, b, dt, cum)


@dataclass(frozen=True)
class Mamba2:
    """The rule of a Mamba-2 layer (attribute names as transformers' Granite 4.0 hybrid)."""

    @torch.no_grad()
    def factors(
        self, layer: nn.Module, real: Tensor, mask: Tensor | None, dtype: torch.dtype, uniform: bool = False
    ) -> MambaFrozen:
        """The frozen factors from the real input; ``uniform``: the gate's product by the uniform
        rule (half through ``z``)."""
        sel = _select(layer, real, mask, None)
        gate = F.silu(sel.z) * sel.post
        through_z = None
        if uniform:
            gate = 0.5 * gate
            through_z = (0.5 * sel.y * identity_ratio(F.silu, sel.z) * sel.post).to(dtype)
        kept = None if _compat.mamba_mask(mask) is None else sel.keep.to(dtype)
        mix, skip = sel.mix.to(dtype), sel.skip.to(dtype)
        return MambaFrozen(sel.ratio.to(dtype), mix, skip, gate.to(dtype), kept, through_z)

    def _mixed(self, layer: nn.Module, frozen: MambaFrozen, conv: Tensor) -> Tensor:
        """After the convolution (``conv [..., B, T, I]``): the frozen ratio, the state-space mix
        and skip, and the frozen gate (before ``out_proj``)."""
        mod: Any = layer
        _, _, heads, hd, _ = _sizes(mod)
        x = conv * frozen.ratio
        per_head = x.view(*x.shape[:-1], heads, hd)
        y = torch.einsum("bhts,...bshp->...bthp", frozen.mix, per_head) + frozen.skip[:, None] * per_head
        return y.reshape(x.shape) * frozen.gate

    def apply(self, layer: nn.Module, frozen: MambaFrozen, x: Tensor) -> Tensor:
        """The layer's linear map of ``x [..., B, T, hidden]`` (components or a graph's input)."""
        mod: Any = layer
        inter = _sizes(mod)[0]
        masked = x if frozen.keep is None else x * frozen.keep
        out = self._mixed(
            layer, frozen, _conv(mod, X_ROWS.linear(layer, masked), slice(0, inter), bias=False)
        )
        if frozen.through_z is not None:
            out = out + Z_ROWS.linear(layer, masked) * frozen.through_z
        return OUT.linear(layer, out)

    def bias(self, layer: nn.Module, frozen: MambaFrozen, like: Tensor) -> Tensor | None:
        """The bias share ``[B, T, hidden]``: ``in_proj``'s ``x``-row bias through the
        convolution, the convolution's bias, both through the frozen factors, and ``out_proj``'s."""
        mod: Any = layer
        inter = _sizes(mod)[0]
        b_in, b_conv, b_out = X_ROWS.bias(layer), mod.conv1d.bias, OUT.bias(layer)
        b_z = None if frozen.through_z is None else Z_ROWS.bias(layer)
        if b_in is None and b_conv is None and b_out is None and b_z is None:
            return None
        batch, t = frozen.ratio.shape[:2]
        out = like.new_zeros((batch, t, int(mod.hidden_size)))
        if b_in is not None or b_conv is not None:
            rows = like.new_zeros((batch, t, inter))
            rows = rows if b_in is None else rows + b_in.to(rows)
            out = out + OUT.linear(
                layer, self._mixed(layer, frozen, _conv(mod, rows, slice(0, inter), bias=True))
            )
        if b_z is not None and frozen.through_z is not None:
            out = out + OUT.linear(layer, b_z.to(out) * frozen.through_z)
        return out if b_out is None else out + b_out.to(out)


@dataclass
class MambaState:
    """Forward mode's past of one Mamba-2 layer, positions ``0 : length``: the real convolution
    window (the last ``K - 1`` inputs, zeros before the start), the real ``x``, ``B`` (per
    head), ``dt`` and its running sum times ``A``; and, row 0 the bias share and rows ``1:``
    the components, ``in_proj``'s ``x`` rows over the window and the values after the
    activation ratio. Grows with every call, as a value cache does."""

    length: int
    window: Tensor  # [B, K - 1, conv_dim]
    x: Tensor  # [B, S, I]
    b: Tensor  # [B, S, H, N]
    dt: Tensor  # [B, S, H]
    cum: Tensor  # [B, S, H]
    lin_window: Tensor  # [1 + C, B, K - 1, I]
    lin: Tensor  # [1 + C, B, S, I]


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    """``t`` with zero rows appended along dim 0 up to ``rows`` (new components had no past)."""
    return t if t.shape[0] >= rows else torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


@torch.no_grad()
def forward_step(
    layer: nn.Module,
    past: MambaState | None,
    real: Tensor,
    mask: Tensor | None,
    comps: Tensor,
    residual: Tensor | None,
) -> tuple[Tensor, Tensor, MambaState]:
    """Forward mode: the layer on ``q`` new positions after ``past`` (None: the first call),
    exactly as the stock layer runs them from its cache. Returns the components
    ``[C, B, q, hidden]``, the bias share ``[B, q, hidden]`` and the grown state. The
    bias share's path (``in_proj``'s ``x``-row bias, the convolution's, the previous bias share)
    is row 0 of one stack with the components, so both go through the same maps."""
    mod: Any = layer
    inter, _, heads, hd, _ = _sizes(mod)
    batch, q, _ = real.shape
    k1 = int(mod.conv1d.weight.shape[-1]) - 1
    sel = _select(mod, real, mask, past)
    keep, ratio, mix, skip, s_len = sel.keep, sel.ratio, sel.mix, sel.skip, sel.x.shape[1]
    gate = (F.silu(sel.z) * sel.post).to(comps.dtype)
    weight = mod.conv1d.weight.detach().float()
    bias = None if mod.conv1d.bias is None else mod.conv1d.bias.detach().float()
    # -- the linear side: the bias path (row 0) and the components, through the same maps ------
    rows = comps.shape[0] + 1
    dtype = comps.dtype
    lin_new = X_ROWS.linear(layer, comps * keep.to(dtype))  # [C, B, q, I]
    b_in = X_ROWS.bias(layer)
    bias_row = comps.new_zeros((1, batch, q, inter))
    bias_row = bias_row if b_in is None else bias_row + b_in.to(dtype)  # in_proj(h * mask) keeps its bias
    if residual is not None:
        bias_row = bias_row + X_ROWS.linear(layer, residual * keep.to(dtype))
    lin_new = torch.cat([bias_row, lin_new])
    lin_window = (
        comps.new_zeros((rows, batch, k1, inter)) if past is None else _pad_rows(past.lin_window, rows)
    )
    stacked = torch.cat([lin_window, lin_new], 2)  # [1 + C, B, K - 1 + q, I]
    flat = stacked.reshape(rows * batch, k1 + q, inter).transpose(1, 2)
    conv = (
        F.conv1d(flat, weight[:inter].to(dtype), groups=inter).transpose(1, 2).reshape(rows, batch, q, inter)
    )
    conv[0] = conv[0] + (0 if bias is None else bias[:inter].to(dtype))  # the convolution's own bias
    values = conv * ratio.to(dtype)
    all_values = values if past is None else torch.cat([_pad_rows(past.lin, rows), values], 2)
    mixed = torch.einsum(
        "bhts,nbshp->nbthp", mix.to(dtype), all_values.view(rows, batch, s_len, heads, hd)
    ) + skip.to(dtype)[:, None] * values.view(rows, batch, q, heads, hd)
    out = OUT.linear(layer, mixed.reshape(rows, batch, q, inter) * gate)
    b_out = OUT.bias(layer)
    res = out[0] if b_out is None else out[0] + b_out.to(dtype)
    new_state = MambaState(
        length=s_len,
        window=sel.window,
        x=sel.x,
        b=sel.b,
        dt=sel.dt,
        cum=sel.cum,
        lin_window=stacked[:, :, -k1:] if k1 else stacked[:, :, :0],
        lin=all_values,
    )
    return out[1:], res, new_state
