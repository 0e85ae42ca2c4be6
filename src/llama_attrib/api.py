"""The public entry points: ``wrap``, ``unwrap``, ``is_wrapped`` and ``decompose``.

``wrap(model)`` replaces, on this instance only, ``forward`` and ``generate`` of the
top-level model and ``forward`` of its leaf modules (embedding, RMSNorms, attentions,
MLPs, LM head). Without ``decompose=True`` (or an enclosing ``decompose()`` block) every
replacement calls the original and does nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pydec
import torch
from torch import Tensor, nn

from . import families
from . import targets as _targets
from .adapters import forward_adapter, generate_adapter
from .composition import SHARES, Contributions
from .engines import (
    MODES,
    Groups,
    Inputs,
    Options,
    TargetRun,
    as_batch,
    explain,
    group_members,
)
from .engines.inputs import last_real, positions_from_mask, token_ids
from .errors import UnsupportedOptionError
from .patching import replace_method
from .rules.sets import RuleSet, rule_set
from .session import SENTINEL, Session, session_of


def is_wrapped(model: nn.Module) -> bool:
    """Whether ``model`` is currently wrapped by llama_attrib."""
    return session_of(model) is not None


def wrap(model: nn.Module, rules: str | RuleSet | None = None) -> nn.Module:
    """Make ``model`` decomposable, in place, and return it.

    ``rules``: the rule set of every decomposition that names none (``"exact"``, the default,
    ``"attnlrp"`` or ``"attnlrp-path"``: :mod:`llama_attrib.rules.sets`, or a ``RuleSet``);
    a model with a kind of module the rule set has no rule for is refused here. On a wrapped
    model it replaces the one
    it had.

    Checks everything first (architecture, stock module classes, biases, attention
    implementation, training mode) and raises ``UnsupportedModelError`` listing every
    problem before anything is touched. Wrapping a model that is already wrapped returns it
    unchanged: patches never stack, and one ``unwrap`` undoes it.
    """
    chosen = None if rules is None else rule_set(rules)
    found = session_of(model)
    family = found.family if found is not None else families.check(model)
    if chosen is not None:
        families.refuse_missing_rules(model, family, chosen)
    if found is not None:
        if chosen is not None:
            found.rule_set = chosen
        return model
    session = Session(model, family)
    if chosen is not None:
        session.rule_set = chosen
    session.install(model)
    try:
        session.patches.append(replace_method(model, "forward", lambda f: forward_adapter(session, model, f)))
        session.patches.append(
            replace_method(model, "generate", lambda g: generate_adapter(session, model, g))
        )
    except BaseException:
        session.restore()
        raise
    model.__dict__[SENTINEL] = session
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Undo :func:`wrap` exactly: every module's ``__dict__`` is as it was before."""
    session = model.__dict__.pop(SENTINEL, None)
    if session is None:
        raise ValueError("unwrap: this model is not wrapped by llama_attrib")
    session.restore()
    return model


@contextmanager
def decompose(model: nn.Module, rules: str | RuleSet | None = None) -> Iterator[nn.Module]:
    """Decompose every forward and generate inside the block, without extra arguments.

    Wraps the model on entry if needed and unwraps it on exit (also on an exception); a
    model that was already wrapped stays wrapped. Blocks nest. ``rules``: the rule set inside
    the block (default: the model's, ``"exact"`` unless :func:`wrap` chose another).
    """
    chosen = None if rules is None else rule_set(rules)
    if chosen is not None:
        families.refuse_missing_rules(model, families.check(model), chosen)
    wrapped_here = not is_wrapped(model)
    wrap(model)
    session = session_of(model)
    assert session is not None
    session.forced += 1
    before = session.rule_set
    if chosen is not None:
        session.rule_set = chosen
    try:
        yield model
    finally:
        session.rule_set = before
        session.forced -= 1
        if wrapped_here and session_of(model) is session:
            unwrap(model)


def decompose_sequence(
    model: nn.Module,
    input_ids: Tensor,
    prompt_length: int | None = None,
    *,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    mode: str = "target",
    targets: Any = None,
    groups: Groups | None = None,
    component_dtype: torch.dtype | None = None,
    max_memory: int | str | None = None,
    progress: bool | None = None,
    precision: str | None = None,
    rules: str | RuleSet | None = None,
) -> tuple[pydec.Composition, ...]:
    """Decompose every token after the prompt of a finished sequence, in one pass.

    ``input_ids``: ``[T]`` or ``[batch, T]`` (prompt + generated tokens). With
    ``prompt_length=P`` it returns one Composition per token after the prompt, like
    ``generate(..., decompose=True)``: step ``k`` explains the logits at position ``P-1+k``
    (which predicted ``input_ids[P+k]``) and has ``P+k`` components. Without it, one
    Composition for the logits at the last position.

    ``targets``: what each step explains up front: ``None`` (the next token of the sequence,
    or the argmax at the last position), a token id, one id per step, a pair ``(a, b)`` for
    the difference ``logit_a - logit_b`` (ids or one per step), ``"logprob"`` (the next
    token's log-probability target), or a :class:`~llama_attrib.targets.Target` (one for
    every step, or a list with one per step). Any other token is available afterwards as
    ``c[token]`` and any other target as ``c.explain(target)`` (one more pass in target mode).

    ``groups``: one component per span of positions: ``{"system": (0, 12), ...}`` (a name
    may map to several spans), a list of ``(start, end)`` spans, or a ``[T]`` tensor of group
    ids; positions outside every span form one more component, ``"other"``.

    ``component_dtype``, ``max_memory``, ``progress``, ``precision``, ``rules``: how the
    decomposition runs, as everywhere (:class:`llama_attrib.engines.Options`: the rule sets
    are ``"exact"``, the default or the wrapped model's, ``"attnlrp"`` and ``"attnlrp-path"``,
    target mode only).
    """
    if mode not in MODES:
        raise UnsupportedOptionError(f"mode must be one of {MODES}, not {mode!r}")
    inputs, members, names, resolved = _prepare(
        model, input_ids, prompt_length, attention_mask, position_ids, targets, groups
    )
    options = Options(component_dtype, max_memory, progress, precision, rules_of(model, rules))
    return explain(model, inputs, mode=mode, targets=resolved, members=members, names=names, options=options)


def decompose_answer(
    model: nn.Module,
    input_ids: Tensor,
    prompt_length: int,
    *,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    targets: Any = None,
    groups: Groups | None = None,
    component_dtype: torch.dtype | None = None,
    max_memory: int | str | None = None,
    progress: bool | None = None,
    precision: str | None = None,
    rules: str | RuleSet | None = None,
) -> pydec.Composition:
    """The answer as a whole: the sum of the logits of every token after the prompt,
    decomposed over the sources in one backward pass, whatever the answer's length.

    Equals the sum over steps of :func:`decompose_sequence`'s components for the same
    ``targets`` (each step's components beyond its own position counted as zero), which costs
    one backward pass per step: use this one for "which part of the prompt did the answer come
    from". Returns a Composition with one component per position but the last (or per group:
    ``groups`` as in :func:`decompose_sequence`), ``[C]`` or ``[C, batch]``; its ``shares``
    are what belongs to no token by name (``bias``, ``rounding``, ``unassigned``; their sum is
    pydec's ``residual``), and components and shares add up to the summed logit (checked
    against the stock model's own logits). The other keywords are :func:`decompose_sequence`'s.
    Target mode only.
    """
    length = token_ids(model, input_ids).shape[1]
    if prompt_length is None or not 1 <= prompt_length < length:
        raise UnsupportedOptionError(
            "decompose_answer needs prompt_length=P with 1 <= P < the sequence's length (the answer "
            "is every token after the prompt)"
        )
    inputs, members, names, resolved = _prepare(
        model, input_ids, prompt_length, attention_mask, position_ids, targets, groups
    )
    options = Options(component_dtype, max_memory, progress, precision, rules_of(model, rules))
    run = TargetRun.of(model, inputs, members, names, options)
    out = run.answer(resolved)  # [B, C + len(SHARES)]
    components, shares = out[:, : -len(SHARES)].T, out[:, -len(SHARES) :]
    if out.shape[0] == 1:
        components, shares = components[:, 0], shares[0]
    return Contributions.of(components, shares=shares)


def rules_of(model: nn.Module, rules: str | RuleSet | None) -> RuleSet:
    """``rules`` if given, else the wrapped model's rule set, else the exact rules."""
    if rules is not None:
        return rule_set(rules)
    session = session_of(model)
    return session.rule_set if session is not None else rule_set(None)


def _prepare(
    model: nn.Module,
    input_ids: Tensor,
    prompt_length: int | None,
    attention_mask: Tensor | None,
    position_ids: Tensor | None,
    targets: Any,
    groups: Groups | None,
) -> tuple[Inputs, Tensor | None, tuple[str, ...] | None, list[_targets.Target] | None]:
    """The teacher-forced pass of a finished sequence: inputs, group members and names, and
    each step's target."""
    ids = token_ids(model, input_ids)
    batch, length = ids.shape
    families.check_length(model, length)
    mask = None if attention_mask is None else as_batch(attention_mask, "attention_mask")
    if mask is not None and mask.shape != ids.shape:
        raise UnsupportedOptionError(
            f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}: they must match"
        )
    ids, mask, position_ids = families.to_input_device(model, ids, mask, position_ids)
    if position_ids is None and mask is not None:
        position_ids = positions_from_mask(mask)
    last = None
    if prompt_length is None or prompt_length >= length:
        positions, next_tokens, used = [length - 1], None, length
        last = last_real(mask, length)  # right padding: each row's last real token
    else:
        if prompt_length < 1:
            raise UnsupportedOptionError("prompt_length must be at least 1")
        positions, next_tokens, used = (
            list(range(prompt_length - 1, length - 1)),
            ids[:, prompt_length:],
            length - 1,
        )
    inputs = Inputs(
        ids[:, :used],
        None if mask is None else mask[:, :used],
        None if position_ids is None else as_batch(position_ids, "position_ids")[:, :used],
        positions,
        last,
    )
    members, names = (None, None) if groups is None else group_members(groups, length)
    if members is not None:
        members = members[:, :used]
    return inputs, members, names, _targets.per_step(targets, next_tokens, len(positions), batch)


__all__ = ["decompose", "decompose_answer", "decompose_sequence", "is_wrapped", "unwrap", "wrap"]
