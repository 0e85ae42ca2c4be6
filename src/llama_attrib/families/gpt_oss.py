"""GPT-OSS: attention sinks (a learned logit per head in each softmax, whose probability mass
goes to no token), sliding windows on alternate layers, biases on every projection, and a
top-k mixture whose SwiGLU experts clamp and offset (:class:`llama_attrib.rules.ClampedExperts`:
routing weights, gates and the clamps' masks frozen; the up biases, the clamps' constants and
the ``+ 1`` offset are the bias share)."""

from .. import rules
from . import register_family, standard

GPT_OSS = register_family(
    standard(
        "GptOss",
        name="gpt_oss",
        mlp=rules.ClampedExperts(),
        inner=("GptOssTopKRouter", "GptOssExperts"),
        notes=(
            "attention sinks inside the frozen probabilities (their mass belongs to no token); "
            "routing weights, each expert's clamped gate and its up clamp's mask frozen; up biases, "
            "the clamp's constant and the +1 offset in the bias share"
        ),
    )
)
