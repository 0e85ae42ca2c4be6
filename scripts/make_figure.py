"""The README's pictures: SmolLM2-135M-Instruct's answer, every prompt token's contribution
(docs/images/capital.png), and where the answer's logit travelled, by layer
(docs/images/flow.png).

    python scripts/make_figure.py
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import llama_attrib
from llama_attrib.models import load


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "docs/images/capital.png"
    flow_out = sys.argv[2] if len(sys.argv) > 2 else "docs/images/flow.png"
    model, tokenizer = load()
    result = llama_attrib.attribute(model, tokenizer, "What is the capital of France?", 6, chat=True)
    view = result.words().normalize("logit", drop_first=True)
    keep = [j for j, cols in enumerate(view.columns) if cols[0] < result.prompt_length]
    view = view.grouped([view.columns[j] for j in keep], [view.sources[j] for j in keep])
    ax = view.plot()
    ax.set_title(f"{result.generation.strip()!r}: contribution of each prompt word (logit units)")
    ax.figure.tight_layout()
    ax.figure.savefig(out, dpi=110)
    plt.close(ax.figure)
    print(result.table(top=3))
    step = next(k for k, t in enumerate(result.generated_tokens) if "Paris" in t)
    f = result.flow(step)
    groups = [c for c in result.words().columns if c[-1] < result.prompt_length + step]
    words = f.grouped(groups, ["".join(result.tokens[i] for i in g) for g in groups])
    sub = words.only([j for j, g in enumerate(groups) if 0 < g[0] < result.prompt_length])
    ax = sub.plot_layers()
    ax.set_title(f"{result.generated_tokens[step]!r}: each prompt word's direct contribution, by layer")
    ax.figure.tight_layout()
    ax.figure.savefig(flow_out, dpi=110)
    plt.close(ax.figure)
    print(f.table(5))


if __name__ == "__main__":
    main()
