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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


@dataclass(frozen=True)
class Mamba2:
    """The rule of a Mamba-2 layer (attribute names as transformers' Granite 4.0 hybrid)."""

    @torch.no_grad()
    def factors(
        self, layer: nn.Module, real: Tensor, mask: Tensor | None, dtype: torch.dtype, uniform: bool = False
    ) -> MambaFrozen:
        """The frozen factors from the real input; ``uniform``: the gate's product by the uniform
        rule (half through ``z``)."""
        mod: Any = layer
        inter, gn, heads, hd, groups = _sizes(mod)
        h = real.float() if mask is None else real.float() * mask[..., None].float()
        z, xbc, dt = IN.affine(layer, h).float().split([inter, inter + 2 * gn, heads], dim=-1)
        u = _conv(mod, xbc, slice(None), bias=True)
        act: Any = mod.act
        keep = torch.ones_like(u[..., :1]) if mask is None else mask[..., None].float()
        ratio = identity_ratio(act, u[..., :inter]) * keep
        x = act(u[..., :inter]) * keep
        b, c = (act(part) * keep for part in u[..., inter:].split([gn, gn], dim=-1))
        dt = F.softplus(dt + mod.dt_bias.detach().float())
        low, high = mod.time_step_limit or (0.0, float("inf"))
        dt = dt.clamp(min=low, max=high)  # [B, T, H]
        a = -torch.exp(mod.A_log.detach().float())  # [H]
        batch, t = real.shape[:2]
        state = gn // groups
        b = b.view(batch, t, groups, state).repeat_interleave(heads // groups, dim=2)
        c = c.view(batch, t, groups, state).repeat_interleave(heads // groups, dim=2)
        scores = torch.einsum("bthn,bshn->bhts", c, b)
        cum = torch.cumsum(dt * a, dim=1).transpose(1, 2)  # [B, H, T]
        causal = torch.ones(t, t, dtype=torch.bool, device=real.device).tril()
        gap = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, -torch.inf)
        mix = scores * torch.exp(gap) * dt.transpose(1, 2)[:, :, None, :]
        skip = mod.D.detach().float()
        y = torch.einsum("bhts,bshp->bthp", mix, x.view(batch, t, heads, hd)) + skip[:, None] * x.view(
            batch, t, heads, hd
        )
        gated = y.reshape(batch, t, inter) * F.silu(z)
        norm: Any = mod.norm
        size = int(norm.group_size)
        grouped = gated.view(batch, t, inter // size, size)
        scale = torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + float(norm.variance_epsilon))
        post = scale.expand_as(grouped).reshape(batch, t, inter) * norm.weight.detach().float()
        gate = F.silu(z) * post
        through_z = None
        if uniform:
            gate = 0.5 * gate
            through_z = (0.5 * y.reshape(batch, t, inter) * identity_ratio(F.silu, z) * post).to(dtype)
        kept = None if mask is None else keep.to(dtype)
        return MambaFrozen(ratio.to(dtype), mix.to(dtype), skip.to(dtype), gate.to(dtype), kept, through_z)

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
