"""Qwen2 / Qwen2.5 (biases on q, k, v) and Qwen3 (RMSNorms on q and k)."""

from . import register_family, standard

QWEN2 = register_family(
    standard(
        "Qwen2", notes="q/k/v biases: q/k change only the frozen probabilities, v's share is the bias row"
    )
)
QWEN3 = register_family(
    standard("Qwen3", inner=("Qwen3RMSNorm",), notes="q/k RMSNorms: inside the frozen probabilities")
)
