"""IBM Granite 4.0's hybrids (``granitemoehybrid``): Mamba-2 layers beside attention layers,
each followed by a mixture of experts and a shared MLP on the same input, with Granite's
multipliers. A decoder layer holds either ``mamba`` or ``self_attn`` (the other is None), and
``block_sparse_moe`` only where the config has experts.

The Mamba-2 layers (:mod:`llama_attrib.rules.mamba`): ``dt``, ``B``, ``C``, the convolution's
activation ratio and the gated norm's factors frozen from the real hidden state, so the state
and the output are linear in the sources, as attention is with its probabilities frozen. The
experts as Granite's router gives them (a softmax over its top-k logits, frozen); the shared
MLP a SwiGLU whose gate and up rows are the two halves of one fused ``input_linear``.
(transformers 4.x writes the experts, the router and the cache another way:
:mod:`llama_attrib._compat` reads both.)
"""

from .. import rules
from ..rules.mamba import Mamba2
from . import ATTENTION, EMBEDDING, LLAMA_EXPERTS, MIXER, MLP, NORM, Family, register_family

SHARED_MLP = rules.mlp.fused_gated_mlp("input_linear", "output_linear", act="activation")

GRANITE_HYBRID = register_family(
    Family(
        name="granitemoehybrid",
        model_classes=("GraniteMoeHybridForCausalLM",),
        classes={
            NORM: ("GraniteMoeHybridRMSNorm",),
            ATTENTION: ("GraniteMoeHybridAttention",),
            MIXER: ("GraniteMoeHybridMambaLayer",),
            MLP: ("GraniteMoeHybridMoE", "GraniteMoeHybridMLP"),
            EMBEDDING: ("Embedding",),
        },
        layer_roles={
            "input_layernorm": NORM,
            "mamba": MIXER,
            "self_attn": ATTENTION,
            "post_attention_layernorm": NORM,
            "block_sparse_moe": MLP,
            "shared_mlp": MLP,
        },
        optional=("mamba", "self_attn", "block_sparse_moe"),
        mlp=rules.SparseMoE(LLAMA_EXPERTS),  # 4.x's block returns (hidden states, router logits)
        mlps={"GraniteMoeHybridMLP": SHARED_MLP},
        mixer=Mamba2(),
        logits_scaling="logits_scaling",
        residual_multiplier="residual_multiplier",
        inner=(
            "GraniteMoeHybridTopKRouter",
            "GraniteMoeHybridExperts",
            "GraniteMoeHybridTopKGating",  # 4.x's router and experts
            "GraniteMoeHybridParallelExperts",
            "Conv1d",
            "GraniteMoeHybridRMSNormGated",
        ),
        notes=(
            "Mamba-2 layers with dt, B, C, the convolution's activation ratio and the gated norm frozen "
            "(the state-space mix an attention matrix that is not normalised); experts and a shared "
            "MLP on the same input; Granite's multipliers"
        ),
    )
)
