"""The precision of target mode's backward products, one option: ``precision=``.

- ``"float32"``: IEEE float32 products (``torch.set_float32_matmul_precision("highest")`` for
  the call). Components equal the independent reference to 1e-5 of the logit.
- ``"tf32"``: TF32 products on a CUDA GPU with tensor cores (``"high"`` for the call); on the
  CPU the same as float32. Measured on the 7B shape in bfloat16 on an H200: 3.7x faster at
  8k tokens, components within 0.7% of the largest float32 component (docs/numerics.md).
- ``"auto"`` (the default): TF32 where that error is below the model's own rounding (a
  bfloat16 or float16 model on CUDA, whose logits carry relative errors of 0.4% per operation
  and whose sums are checked to 5e-2), float32 everywhere else (a float32 model: 1e-5).

The setting is torch's, global to the process, for the length of the decomposing call only:
it is put back afterwards, also after an exception.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import UnsupportedOptionError

PRECISIONS = ("auto", "float32", "tf32")


def resolve(precision: str | None, model_dtype: torch.dtype, device: torch.device) -> str:
    """``"float32"`` or ``"tf32"``: what ``precision`` means for this model and device."""
    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise UnsupportedOptionError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        half = model_dtype in (torch.float16, torch.bfloat16)
        return "tf32" if half and device.type == "cuda" else "float32"
    return precision


@contextmanager
def products(precision: str, device: torch.device) -> Iterator[None]:
    """float32 matrix products in ``precision`` for the block (CUDA only: the CPU's are float32)."""
    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
