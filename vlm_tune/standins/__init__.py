"""Offline stand-ins: models, processors and data built locally, so that everything runs without the hub.

A stand-in imitates a published checkpoint where it matters to vlm-tune (the model and processor classes,
the chat template, special tokens and processor settings, pinned in `vlm_tune.families`) and replaces what a
test or a benchmark cannot download: the weights are random and the dims tiny (or, for the benchmark shapes,
the published dims with random weights). A stand-in is an ordinary `save_pretrained` directory, so loading,
LoRA, saving and inference go through the same code as a hub model. Built stand-ins are cached by directory
name and a JSON spec marker (`model.cache_dir`; see `scaffold`), never by module path.

Modules (imported where used; this package imports nothing):
- `scaffold`: what every builder shares: the offline BPE tokenizer, the spec marker, the atomic cached save.
- each family's own stand-in (`builtin:tiny` for SmolVLM, `builtin:tiny-qwen2.5-vl`, ...) is built in its family
  module (`vlm_tune.families.smolvlm.build_tiny_model`, `qwen._build`, ...) on this scaffold, so everything about
  a family stays in one place.
- `real_decoder`: a SmolVLM around the real SmolLM2-135M decoder (`builtin:smollm2-135m`).
- `shapes`: random-weight models with the published SmolVLM-256M / 2.2B dims, for benchmarks.
- `rehearsal`: a stand-in for each shipped config's checkpoint, plus ChartQA- and clip-shaped data.
- `published_check`: where a saved stand-in departs from the published files it imitates.
"""
