"""The decomposition rules: pure maths on components, one module per kind of module.

Frozen factors (norm scales, attention probabilities, an MLP's gate or activation ratio,
routing weights) are computed from the real hidden state and applied to every component
alike, so each rule is linear in the components and their sum follows the real computation.
See :mod:`.linear` for what the rules share. The sizes target mode works in (``scores.BLOCK_BYTES``,
``scores.KEEP_BYTES``, ``mlp.ROWS``, ``linear.CHUNK_ELEMENTS``) are read from their modules at run time.
"""

from . import experts, linear, lrp, mamba, mlp, scores, sets
from .attention import Attention, ValueCache, attention, attention_graph
from .experts import ClampedExperts
from .kernels import frozen_mix
from .linear import Layout, Proj, Rounding, embedding, positionwise, rounding, scale
from .mlp import MLP, SHARED, Expert, GatedMLP, SparseMoE
from .norm import LayerNorm, Norm, RMSNorm
from .scores import MIN_BLOCK_BYTES, FrozenProbabilities, block_bytes, mix
from .sets import ATTNLRP, EXACT, RULE_SETS, RuleSet, rule_set

__all__ = [
    "ATTNLRP",
    "EXACT",
    "MIN_BLOCK_BYTES",
    "MLP",
    "RULE_SETS",
    "SHARED",
    "Attention",
    "ClampedExperts",
    "Expert",
    "FrozenProbabilities",
    "GatedMLP",
    "LayerNorm",
    "Layout",
    "Norm",
    "Proj",
    "RMSNorm",
    "Rounding",
    "RuleSet",
    "SparseMoE",
    "ValueCache",
    "attention",
    "attention_graph",
    "block_bytes",
    "embedding",
    "experts",
    "frozen_mix",
    "linear",
    "lrp",
    "mamba",
    "mix",
    "mlp",
    "positionwise",
    "rounding",
    "rule_set",
    "scale",
    "scores",
    "sets",
]
