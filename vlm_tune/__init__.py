"""vlm-tune: fine-tune vision-language models for chart question answering."""

from vlm_tune import quiet as _quiet

__version__ = "0.1.0"
_quiet.install()
