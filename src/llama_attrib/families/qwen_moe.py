"""Qwen2-MoE and Qwen3-MoE: sparse mixtures of experts in Llama's layout, with dense MLP layers
wherever ``mlp_only_layers`` or ``decoder_sparse_step`` put one. The router's weights are
frozen factors and each chosen expert is a SwiGLU (gate frozen); Qwen2-MoE adds a shared
expert whose sigmoid gate is frozen too. Qwen3-MoE's q/k norms act inside the frozen
probabilities."""

from .. import rules
from . import LLAMA_EXPERTS, SWIGLU, register_family, standard

QWEN2_MOE = register_family(
    standard(
        "Qwen2Moe",
        classes={"mlp": ("Qwen2MoeSparseMoeBlock", "Qwen2MoeMLP")},
        mlp=rules.SparseMoE(
            LLAMA_EXPERTS, shared="shared_expert", shared_gate="shared_expert_gate", shared_rule=SWIGLU
        ),
        mlps={"Qwen2MoeMLP": SWIGLU},
        inner=("Qwen2MoeTopKRouter", "Qwen2MoeExperts", "Qwen2MoeMLP", "ModuleList"),
        notes=(
            "sparse MoE with a shared expert: router weights and the shared expert's sigmoid gate "
            "frozen, each expert a SwiGLU (gate frozen); q/k/v biases as in Qwen2"
        ),
    )
)
QWEN3_MOE = register_family(
    standard(
        "Qwen3Moe",
        classes={"mlp": ("Qwen3MoeSparseMoeBlock", "Qwen3MoeMLP")},
        mlp=rules.SparseMoE(LLAMA_EXPERTS),
        mlps={"Qwen3MoeMLP": SWIGLU},
        inner=("Qwen3MoeTopKRouter", "Qwen3MoeExperts", "Qwen3MoeMLP", "Qwen3MoeRMSNorm", "ModuleList"),
        notes="sparse MoE: router weights frozen, each chosen expert a SwiGLU (gate frozen); q/k norms",
    )
)
