"""How much memory a decomposition needs, and how much there is.

The estimates count the tensors a run keeps alive at its peak, per mode; they were checked
against measured peak RSS on this project's CPU benchmarks (``benchmarks/bench.py``) and err
on the high side. They decide how many components (forward mode) or how many target
cotangents (target mode) one pass processes; a run that cannot fit even one is refused
before it starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import rules
from .errors import LlamaAttribError
from .families import input_device, text_config
from .rules.sets import rule_set

LEAN_BYTES = 64 << 20  # target mode's working memory without max_memory, at least
# What the tensors a pass keeps whatever its targets (TargetSizes.graph) come to in a process's
# peak memory: allocator slack and short-lived temporaries, fitted on
# benchmarks/long_documents.py (SmolLM2 at 4k and 8k tokens, the 8-layer shape at 2k).
SLACK = 1.4
# The same on an accelerator, whose caching allocator leaves less slack: fitted on
# benchmarks/gpu.sh (the 7B shape in bfloat16 on an H200 at 512 to 32k tokens: the counted
# bytes were 0.87-1.18 of the growth of torch.cuda.max_memory_allocated).
DEVICE_SLACK = 1.1
# An attention rule that credits queries and keys (rules="attnlrp") says how much working
# memory a target needs in a batched backward against the exact rules' (``work``: the gradients
# of the queries, keys and values, and of the gate's side of the MLP; rules.sets.Credited). Its
# backward computes four products per target where the exact rules compute one, so batching
# fewer targets (each batch computes the probabilities again) costs little time: 73.0 s with 2
# targets per backward, 74.2 s with 8 (SmolLM2, 2048 + 8).


class MemoryBudgetError(LlamaAttribError):
    """A run would not fit in the memory budget, even processed in the smallest chunks."""


@dataclass(frozen=True)
class Shape:
    """The sizes that memory depends on, read from a model's config."""

    layers: int
    hidden: int
    heads: int
    kv_dim: int
    intermediate: int
    vocab: int

    @staticmethod
    def of(model: nn.Module) -> Shape:
        config: Any = text_config(model)
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        return Shape(
            layers=int(config.num_hidden_layers),
            hidden=int(config.hidden_size),
            heads=heads,
            kv_dim=kv * head_dim,
            intermediate=int(
                getattr(config, "intermediate_size", None)
                or getattr(config, "n_inner", None)  # GPT-2; None there means 4 x hidden
                or 4 * int(config.hidden_size)
            ),
            vocab=int(config.vocab_size),
        )


@dataclass(frozen=True)
class TargetSizes:
    """Bytes target mode keeps (:mod:`llama_attrib.sweep`): ``graph``, whatever the targets
    (each layer's input, one layer's graph, blocks of attention probabilities); ``state``,
    per target for a whole sweep (its gradient between two layers); ``work``, per target in
    one batched backward through a layer (its gradient out beside the one in, temporaries)."""

    graph: int
    state: int
    work: int
    factor: int = 1  # the attention rule's working memory per target, in the exact rules' units

    @property
    def per_request(self) -> int:
        return self.state + self.work

    def chunks(self, n: int, budget: int | None = None, unbudgeted: bool = True) -> tuple[int, int]:
        """``(targets per batched backward, targets per sweep)`` for ``n`` targets within
        ``budget`` bytes (None: no limit). Each target keeps its gradient for a whole sweep;
        a batched backward's working memory grows with the targets it takes. ``unbudgeted`` (no
        explicit budget): keep that working memory within the pass's own size, but at least 4
        targets per backward, since each one computes the attention probabilities again; where
        the attention rule needs more working memory per target (``factor`` > 1: it credits
        queries and keys), within a quarter of it (or :data:`LEAN_BYTES`) and at least 2 (each
        target's own products are four times as many there)."""
        free = (1 << 62) if budget is None else budget - self.graph
        per_chunk = max(1, min(n, free // self.per_request))
        if unbudgeted:
            room, least = max(self.graph, LEAN_BYTES), 4
            if self.factor > 1:
                room, least = max(self.graph // 4, LEAN_BYTES), 2
            per_chunk = min(per_chunk, max(least, room // self.work))
        per_chunk = math.ceil(n / math.ceil(n / per_chunk))  # even: 8 targets by 7 -> 4 + 4, not 7 + 1
        per_sweep = max(per_chunk, (free - per_chunk * self.work) // self.state)
        return per_chunk, min(n, per_sweep)

    def peak(self, n: int, budget: int | None = None, unbudgeted: bool = True) -> int:
        """Bytes at the peak of a run of ``n`` targets chunked as :meth:`chunks` says."""
        per_chunk, per_sweep = self.chunks(n, budget, unbudgeted)
        return self.graph + per_sweep * self.state + per_chunk * self.work

    @staticmethod
    def of(
        shape: Shape,
        batch: int,
        length: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
        model_dtype: torch.dtype | None = None,
        probabilities: tuple[int, int] | None = None,
        factor: int = 1,
    ) -> TargetSizes:
        """The sizes of a run with components in ``dtype`` on ``device`` (default the CPU); each
        layer's input is kept as the model computed it, in ``model_dtype`` (default ``dtype``).
        ``probabilities``: ``(bytes computed at a time, bytes kept)`` if not the defaults;
        ``factor``: the attention rule's working memory per target in the exact rules' units
        (``RuleSet.attention.work``, :mod:`llama_attrib.rules.sets`)."""
        device = device or torch.device("cpu")
        item = torch.empty((), dtype=dtype).element_size()
        stored = torch.empty((), dtype=model_dtype or dtype).element_size()
        slack = SLACK if device.type == "cpu" else DEVICE_SLACK
        tokens = batch * length
        inputs = (shape.layers + 1) * tokens * shape.hidden * stored
        layer = tokens * (3 * shape.intermediate + 10 * shape.hidden + 3 * shape.kv_dim) * item
        # float32 probabilities: a few blocks being computed, and a layer's causal half kept
        # for the backward if it is small enough (else the stock attention's output is the
        # forward's value, and the backward computes them block by block)
        whole = batch * shape.heads * length * length * 4
        block, keep = probabilities or (rules.block_bytes(device), rules.scores.KEEP_BYTES)
        blocks = 3 * min(block, whole) + (whole // 2 if whole // 2 <= keep else 0)
        # per target in a batched backward: its second gradient (out beside in), a gradient or
        # two of the layer's width and one of the values', and one MLP piece's temporaries
        work = (
            tokens * (3 * shape.hidden + shape.kv_dim)
            + batch * min(length, rules.mlp.ROWS) * 2 * shape.intermediate
        ) * item
        return TargetSizes(
            # the per-target terms are whole tensors freed as soon as they are used: they add up
            # to the measured growth as counted (the 8-layer shape at 4 to 32 targets per backward)
            graph=int(slack * (inputs + layer + blocks)),
            state=tokens * shape.hidden * item,  # a target's gradient between two layers
            work=work * factor,  # the MLP's backward: pieces of rules.mlp.ROWS
            factor=factor,
        )


def target_layouts(
    shape: Shape,
    batch: int,
    length: int,
    dtype: torch.dtype,
    device: torch.device,
    model_dtype: torch.dtype,
    factor: int = 1,
) -> list[tuple[TargetSizes, tuple[int, int] | None]]:
    """Target mode's possible sizes, largest first: the default probability blocks, then
    nothing kept for the backward and blocks halved down to :data:`rules.MIN_BLOCK_BYTES`.
    Each is ``(sizes, probabilities)`` (``None``: the defaults), for a budget to choose from.
    ``factor``: as in :meth:`TargetSizes.of`."""
    out: list[tuple[TargetSizes, tuple[int, int] | None]] = [
        (TargetSizes.of(shape, batch, length, dtype, device, model_dtype, factor=factor), None)
    ]
    block = rules.block_bytes(device)
    while True:
        probabilities = (block, 0)
        out.append(
            (
                TargetSizes.of(shape, batch, length, dtype, device, model_dtype, probabilities, factor),
                probabilities,
            )
        )
        if block <= rules.MIN_BLOCK_BYTES:
            return out
        block = max(rules.MIN_BLOCK_BYTES, block // 2)


def forward_component_bytes(shape: Shape, batch: int, length: int, itemsize: int) -> int:
    """One component of forward mode over ``length`` positions (no cache)."""
    width = 8 * shape.hidden + 2 * shape.kv_dim
    return batch * length * width * itemsize


def forward_chunks(
    model: nn.Module, batch: int, length: int, total: int, dtype: torch.dtype, budget: int, refusal: str
) -> tuple[int, int]:
    """``(components per chunk, chunks)`` for a forward-mode pass over ``total`` components of
    ``batch`` x ``length`` tokens within ``budget`` bytes, in even chunks; a run that cannot
    fit one component raises :class:`MemoryBudgetError` (``refusal``: what the user can do)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_component = forward_component_bytes(Shape.of(model), batch, length, itemsize)
    per_chunk = min(total, budget // per_component)
    if per_chunk < 1:
        raise MemoryBudgetError(
            f"forward mode over {batch} x {length} tokens needs about {fmt(per_component)} per "
            f"component; the budget is {fmt(budget)}. {refusal}"
        )
    chunks = math.ceil(total / per_chunk)
    return math.ceil(total / chunks), chunks


def forward_cache_bytes(shape: Shape, batch: int, length: int, itemsize: int) -> int:
    """Forward-mode generation: the decomposed value cache of every layer at ``length``."""
    return shape.layers * batch * length * length * shape.kv_dim * itemsize


def estimate(
    model: nn.Module,
    length: int,
    *,
    batch: int = 1,
    mode: str = "target",
    components: int | None = None,
    steps: int = 1,
    dtype: torch.dtype = torch.float32,
    rules: str | None = None,
) -> int:
    """Bytes a decomposition of ``batch`` sequences of ``length`` tokens keeps at its peak.

    ``mode="target"``: ``steps`` targets, chunked as a run without ``max_memory`` chunks them,
    under the rule set ``rules`` (default ``"exact"``).
    ``mode="forward"``: one pass over ``components`` components (default: one per position).
    ``mode="generate"``: forward-mode generation to ``length`` (value caches included).
    """
    shape = Shape.of(model)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if mode == "target":
        weight = next(model.parameters())
        factor = rule_set(rules).attention.work
        sizes = TargetSizes.of(shape, batch, length, dtype, weight.device, weight.dtype, factor=factor)
        return sizes.peak(steps)
    c = length if components is None else components
    per = forward_component_bytes(shape, batch, length, itemsize)
    if mode == "forward":
        return c * per
    if mode == "generate":
        return c * per + forward_cache_bytes(shape, batch, length, itemsize)
    raise ValueError(f"mode must be 'target', 'forward' or 'generate', not {mode!r}")


def available(device: torch.device) -> int:
    """Memory that can be used now: free device memory, or MemAvailable of the host. On a GPU,
    the blocks PyTorch's caching allocator holds but no tensor uses count as free: after one
    long run they would otherwise halve the next run's budget (and double its sweeps)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else 1 << 34


def budget(max_memory: int | str | None, device: torch.device) -> int:
    """A byte budget from ``max_memory`` (bytes, or '8GB', '512MiB'), else 80% of what is free."""
    if max_memory is None:
        return int(available(device) * 0.8)
    if isinstance(max_memory, int):
        return max_memory
    text = max_memory.strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def model_budget(model: nn.Module, max_memory: int | str | None) -> int:
    """:func:`budget` on the device ``model`` computes on: its input embedding's execution
    device (:func:`llama_attrib.families.input_device`; accelerate's, where it offloads the
    weights, whose parameters then sit on the meta device)."""
    return budget(max_memory, input_device(model))


def fmt(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"
