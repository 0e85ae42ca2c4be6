"""DeepSeek-V3 (and Kimi K2, the same architecture): multi-head latent attention and a
mixture of experts with shared experts.

- The attention's keys and values come from a compressed latent (``kv_a_proj_with_mqa``, its
  RMSNorm, ``kv_b_proj``) beside a decoupled rotary key; the queries from their own low-rank
  pair (``q_a_proj``, its norm, ``q_b_proj``) where ``q_lora_rank`` is set. The probabilities
  are read from whatever queries and keys the stock code makes; the value map is linear with
  the latent norm's scale frozen (:class:`llama_attrib.rules.latent.LatentValue`).
- The router (sigmoid scores, group-limited top-k, renormalised and scaled) gives frozen
  routing weights; each routed expert is a SwiGLU with its gate frozen; the shared experts
  are added as a dense SwiGLU (no gate of their own); the first ``first_k_dense_replace``
  layers are dense.
"""

from .. import rules
from ..rules.latent import LatentValue
from . import LLAMA_EXPERTS, SWIGLU, register_family, standard

DEEPSEEK_V3 = register_family(
    standard(
        "DeepseekV3",
        name="deepseek_v3",
        classes={"mlp": ("DeepseekV3MoE", "DeepseekV3MLP")},
        attention=rules.Attention(value=LatentValue(), out=rules.Proj("o_proj")),
        mlp=rules.SparseMoE(LLAMA_EXPERTS, shared="shared_experts", shared_rule=SWIGLU, router_logits=False),
        mlps={"DeepseekV3MLP": SWIGLU},
        inner=("DeepseekV3TopkRouter", "DeepseekV3Experts", "DeepseekV3MLP", "ModuleList"),
        notes=(
            "latent attention: the value map through the compressed latent, its norm's scale frozen; "
            "routing weights (sigmoid, group-limited top-k) frozen, routed and shared experts SwiGLUs "
            "with their gates frozen"
        ),
    )
)
