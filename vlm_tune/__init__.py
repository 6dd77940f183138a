"""vlm-tune: fine-tune vision-language models for chart question answering."""

__version__ = "0.1.0"
