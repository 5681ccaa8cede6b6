"""QLoRA fine-tuning of chat models on the LCCC Chinese dialogue corpus."""

import logging


class _DropMessagesStartingWith(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# bitsandbytes announces on import, on CPUs with AVX512-BF16, that an optional kernel package from the Hub is
# missing; 4-bit works without it and users cannot act on the line, so it is dropped (other warnings stay).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    _DropMessagesStartingWith("Failed to load CPU gemm_4bit_forward")
)
