"""Made tests/data/saved/attribution_v1.* at commit 4ceb182 (format /1, whose "bias" is the sum
bias + rounding + unassigned), from the repository root:
.venv/bin/python tests/data/saved/make_v1.py
tests/test_shares.py builds the same model (``biased_model``) to compare a new run with them."""

import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PROMPT = "the cat sat on"


def biased_model() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, attention_bias=True,
        mlp_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(31)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            offset = 1.0 if p.dim() == 1 and p.shape[0] == 32 else 0.0  # the norms' weights
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.1).add_(offset)
    return model.eval()


if __name__ == "__main__":
    sys.path.insert(0, "tests")
    import llama_attrib
    from conftest import tiny_tokenizer

    model, tok = biased_model(), tiny_tokenizer()
    r = llama_attrib.attribute(model, tok, PROMPT, max_new_tokens=4, rules="attnlrp")
    r.save("tests/data/saved/attribution_v1.json")
    r.save("tests/data/saved/attribution_v1.safetensors")
