"""Run LXT's own AttnLRP / CP-LRP (upstream source, vendored wheel) on one sequence.

A standalone script for tests that compare llama_attrib's ``rules="attnlrp"``
against the authors' implementation. It is meant to run in a subprocess,
because LXT patches transformers' classes (and ``torch.nn.Dropout``) for the
whole process; it is never imported by pytest or by the library.

    python tests/lxt_reference.py --model DIR --ids '[1, 5, 9]' \
        --rules attnlrp --targets '[[2, 17], [1, 4]]' --out out.pt

For each target ``[position, token_id]`` it explains the logit of ``token_id``
at ``position``: relevance is gradient x input at the output of the model's
input-embedding module (for Gemma 3 that output includes the sqrt(hidden)
scale, i.e. exactly what the first decoder layer receives), summed over the
hidden dimension. It writes ``{"relevance": [n_targets, seq] float32,
"logits": [n_targets] float32}`` with ``torch.save``.

The wheel is tests/data/lxt/lxt-*.whl (see tests/data/lxt/README.md). It
targets transformers 5; under transformers 4.x its (unused here) qwen3_moe
module fails to import and is replaced by an empty stand-in, see _import_lxt.
"""

import argparse
import importlib
import json
import sys
import types
import warnings
from pathlib import Path

WHEEL_DIR = Path(__file__).resolve().parent / "data" / "lxt"

# model_type -> (transformers modeling module, LXT model module)
FAMILIES = {
    "llama": ("transformers.models.llama.modeling_llama", "lxt.efficient.models.llama"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "lxt.efficient.models.qwen2"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "lxt.efficient.models.qwen3"),
    "gemma3_text": ("transformers.models.gemma3.modeling_gemma3", "lxt.efficient.models.gemma3"),
    # transformers 5 only (LXT patches its fused Qwen3MoeExperts); LXT has no cp_LRP map for it
    "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "lxt.efficient.models.qwen3_moe"),
}
RULE_MAPS = {"attnlrp": "attnLRP", "cp": "cp_LRP"}


def _import_lxt():
    wheels = sorted(WHEEL_DIR.glob("lxt-*.whl"))
    if len(wheels) != 1:
        sys.exit(f"lxt_reference: expected exactly one lxt-*.whl in {WHEEL_DIR}, found {len(wheels)}")
    sys.path.insert(0, str(wheels[0]))
    try:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts  # noqa: F401
    except ImportError:
        # transformers 4.x: LXT's package init imports all its model modules, and its
        # qwen3_moe one needs Qwen3MoeExperts (transformers 5 only). No family here uses
        # it, so stand in an empty module; the patches used are upstream's, unchanged.
        stub = types.ModuleType("lxt.efficient.models.qwen3_moe")
        stub.modeling_qwen3_moe = types.ModuleType("lxt_reference_qwen3_moe_stub")
        stub.attnLRP = stub.cp_LRP = {}
        sys.modules[stub.__name__] = stub
    with warnings.catch_warnings():
        # zennit / torchvision are optional upstream (vision models only) and warn when missing.
        warnings.simplefilter("ignore")
        import lxt.efficient
    origin = Path(lxt.efficient.__file__)
    if wheels[0] not in origin.parents:
        sys.exit(f"lxt_reference: lxt was imported from {origin}, not from the wheel {wheels[0]}")
    return lxt.efficient


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="save_pretrained directory of a causal LM")
    p.add_argument("--ids", required=True, help="JSON list of token ids (one sequence)")
    p.add_argument("--rules", choices=sorted(RULE_MAPS), default="attnlrp")
    p.add_argument("--targets", required=True, help="JSON list of [position, token_id] pairs")
    p.add_argument("--out", required=True, help="output .pt file")
    args = p.parse_args()
    ids = json.loads(args.ids)
    if not (isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids)):
        p.error("--ids must be a non-empty JSON list of ints")
    targets = json.loads(args.targets)
    if not (
        isinstance(targets, list)
        and targets
        and all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, int) for x in t) for t in targets)
    ):
        p.error("--targets must be a non-empty JSON list of [position, token_id] int pairs")
    for pos, _ in targets:
        if not -len(ids) <= pos < len(ids):
            p.error(f"target position {pos} is outside a sequence of {len(ids)} tokens")
    return args, ids, targets


def main():
    args, ids, targets = _parse()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(args.model)
    family = FAMILIES.get(config.model_type)
    if family is None:
        sys.exit(
            f"lxt_reference: model_type {config.model_type!r} is not supported; "
            f"supported: {', '.join(sorted(FAMILIES))} (gemma3 means the text-only Gemma3ForCausalLM)"
        )
    modeling_name, lxt_name = family

    lxt_efficient = _import_lxt()
    modeling = importlib.import_module(modeling_name)
    patch_map = getattr(importlib.import_module(lxt_name), RULE_MAPS[args.rules], None)
    if patch_map is None:
        sys.exit(f"lxt_reference: LXT has no {RULE_MAPS[args.rules]} map for {config.model_type!r}")
    # Patches the family's classes and attention functions before the model is built.
    lxt_efficient.monkey_patch(modeling, patch_map=patch_map)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    if type(model).__module__ != modeling_name:
        loaded = f"{type(model).__module__}.{type(model).__name__}"
        sys.exit(f"lxt_reference: loaded {loaded}, not a class of {modeling_name}")
    # Guard against upstream drift: every norm and MLP the model holds must be a class
    # LXT patched, and the eager attention function must be LXT's wrapper.
    unpatched = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if type(m).__name__.endswith(("RMSNorm", "MLP", "Experts")) and type(m) not in patch_map
        }
    )
    if unpatched or modeling.eager_attention_forward.__module__ != "lxt.efficient.patches":
        sys.exit(f"lxt_reference: LXT did not patch {unpatched or 'eager_attention_forward'}")
    for param in model.parameters():
        param.requires_grad_(False)

    input_ids = torch.tensor([ids], dtype=torch.long)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        # The embedding module's output (Gemma 3: already times sqrt(hidden)) is what the
        # decoder receives; passing it as inputs_embeds must give the same logits.
        ref_logits = model(input_ids=input_ids, use_cache=False).logits
        emb_logits = model(inputs_embeds=embed(input_ids), use_cache=False).logits
    if not torch.equal(ref_logits, emb_logits):
        diff = (ref_logits - emb_logits).abs().max().item()
        sys.exit(f"lxt_reference: logits from inputs_embeds differ from input_ids ones (max |diff| {diff:g})")

    relevance, logits = [], []
    for pos, token in targets:
        embeddings = embed(input_ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeddings, use_cache=False).logits
        target = out[0, pos, token]
        target.backward()
        relevance.append((embeddings * embeddings.grad).sum(-1)[0].detach().float())
        logits.append(target.detach().float())

    torch.save({"relevance": torch.stack(relevance), "logits": torch.stack(logits)}, args.out)


if __name__ == "__main__":
    main()
