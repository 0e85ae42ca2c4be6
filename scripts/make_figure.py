"""The README's picture: SmolLM2-135M-Instruct's answer, every prompt token's contribution.

    python scripts/make_figure.py [docs/images/capital.png]
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import llama_attrib  # noqa: E402
from llama_attrib.models import load  # noqa: E402


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "docs/images/capital.png"
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


if __name__ == "__main__":
    main()
