"""Mixtral: sparse mixture of experts. The router's weights are frozen factors; the chosen
experts are SwiGLU MLPs (gate frozen, up and down linear). The block's layout differs between
transformers versions: :mod:`llama_attrib._compat` reads both."""

from .. import rules
from . import register_family, standard

MIXTRAL = register_family(
    standard(
        "Mixtral",
        classes={"mlp": ("MixtralSparseMoeBlock",)},
        mlp=rules.SparseMoE(expert_names=("w1", "w3", "w2")),
        inner=("MixtralTopKRouter", "MixtralExperts", "MixtralBlockSparseTop2MLP", "ModuleList"),
        notes="sparse MoE: router weights frozen, each chosen expert a SwiGLU (gate frozen)",
    )
)
