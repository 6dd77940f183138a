"""Library notices that do not concern the run: shown only when they apply.

bitsandbytes logs, on import on an AVX512-BF16 CPU, that the optional `kernels` package for its CPU 4-bit
matmul is missing, or (with `kernels` installed: transformers >= 5.25 requires it) `kernels` logs that it
skips the hub check of that kernel in offline mode. peft imports bitsandbytes for every LoRA model, so
without this filter every command printed it. It is passed through once a 4-bit model is loaded
(`four_bit_in_use()`).
"""

from __future__ import annotations

import logging

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_HUB_LOGGER = "kernels._internals.hf_hub"  # kernels 0.19: the offline trust-check notice
NOTICE_MARKS = ("gemm_4bit_forward", "kernels-community/quantization-bitsandbytes")
_state = {"four_bit": False}


class _FourBitOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return _state["four_bit"] or not any(mark in message for mark in NOTICE_MARKS)


def four_bit_in_use() -> None:
    """A 4-bit model is being loaded: bitsandbytes' notices about its 4-bit kernels apply."""
    _state["four_bit"] = True


def install() -> None:
    """Attach the filter (idempotent)."""
    for name in (BNB_CPU_LOGGER, KERNELS_HUB_LOGGER):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _FourBitOnly) for f in logger.filters):
            logger.addFilter(_FourBitOnly())
