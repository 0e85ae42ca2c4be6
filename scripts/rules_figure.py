"""docs/images/rules.png: one copy prompt explained under each rule set (SmolLM2-135M-Instruct).

    python scripts/rules_figure.py [out.png]

Each row is a rule set; each column a prompt token; the colour is that token's contribution to
the logit of the answer's first non-blank token (logit units, the first token left out), and the row's
label gives what no token got (bias + unassigned).
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import llama_attrib
from llama_attrib.models import load
from llama_attrib.rules import RULE_SETS

PROMPT = "Mira's locker code is 5193 and Tom's is 2806. Mira's locker code is"


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "docs/images/rules.png"
    model, tokenizer = load()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with llama_attrib.decompose(model):  # the answer's first token, greedy
        sequence = model.generate(ids, max_new_tokens=3, do_sample=False, decompose=False)
    # the answer's first token that is not blank (SmolLM2 writes the space before a digit apart)
    p = next(
        j for j in range(ids.shape[1], sequence.shape[1]) if tokenizer.decode([int(sequence[0, j])]).strip()
    )
    token = int(sequence[0, p])
    texts = [tokenizer.decode([int(t)]) for t in sequence[0, :p]]
    rows, labels = [], []
    for name in RULE_SETS:
        c = llama_attrib.decompose_sequence(model, sequence[0, : p + 1], p, rules=name)[0][token]
        scores = c.components.float().numpy().copy()
        scores[0] = np.nan  # the attention sink
        rows.append(scores)
        rest = float(c.shares["bias"] + c.shares["unassigned"])
        labels.append(f"{name}\n(no token: {rest:+.2f})")
        print(name, "top:", [texts[j] for j in np.argsort(-np.nan_to_num(scores, nan=-1e9))[:3]], rest)
    grid = np.stack(rows)
    limit = float(np.nanmax(np.abs(grid)))
    fig, ax = plt.subplots(figsize=(12, 2.6))
    ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(p), [t.replace("\n", "\\n") for t in texts], rotation=60, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_title(
        f"contribution of each prompt token to the logit of {tokenizer.decode([token])!r}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()
