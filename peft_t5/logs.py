"""Logging for the commands: one format, and library chatter that misleads users kept out of it."""
from __future__ import annotations

import logging
import warnings

logger = logging.getLogger(__name__)
# bitsandbytes logs this at import on CPUs with AVX512-BF16, whether or not anything is quantized; transformers'
# training arguments import bitsandbytes, so every run printed it and users read it as a broken install; where the
# `kernels` package is installed (transformers asks for it), it also warns offline that it cannot check the kernel
KERNEL_NOTICE_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


class OptionalKernelNotice(logging.Filter):
    """Drops bitsandbytes' 'Failed to load CPU gemm_4bit_forward from kernels-community' warning (and the `kernels`
    package's about that kernel), remembering it."""

    seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "kernels-community" in record.getMessage():
            OptionalKernelNotice.seen = True
            return False
        return True


def quiet_optional_kernel_notice() -> None:
    """Called when peft_t5 is imported (a notebook, a script importing the bank), before bitsandbytes is."""
    for name in KERNEL_NOTICE_LOGGERS:  # a logger's filters see only its own records, not its children's
        logger_ = logging.getLogger(name)
        if not any(isinstance(f, OptionalKernelNotice) for f in logger_.filters):
            logger_.addFilter(OptionalKernelNotice())


def setup_logging() -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation chatter from PEFT/transformers internals
    quiet_optional_kernel_notice()


def explain_4bit_kernels() -> None:
    """Where 4-bit layers are used: what bitsandbytes' dropped warning meant, in one line."""
    if OptionalKernelNotice.seen:
        logger.warning("bitsandbytes has no optional fast CPU kernel for 4-bit layers here (the `kernels` package "
                       "or its downloaded kernel is missing); it uses its built-in CPU code, which gives the same results, slower")
        OptionalKernelNotice.seen = False  # said once
