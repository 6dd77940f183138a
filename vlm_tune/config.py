"""The config schema: one typed section per concern; this file is the documentation of every key.

`load_config(path, overrides)` reads a YAML file, applies `section.key=value` overrides (values parsed as
YAML scalars: `vlm_tune.config_input`), rejects unknown keys (naming the closest valid one), checks types and
ranges, then checks cross-field rules. Every problem found is reported together in one `ConfigError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vlm_tune.config_input import (
    ConfigError,
    apply_overrides,
    fix_yaml_floats,
    format_errors,
    parse_overrides,  # noqa: F401  (re-exported: `from vlm_tune.config import parse_overrides`)
)
from vlm_tune.errors import UserError
from vlm_tune.rl_config import RlSection, rl_problems

BUILTIN_TINY = "builtin:tiny"
SYNTHETIC = "synthetic"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    name: str = Field("run", description="Run name; used in logs, the model card and the default output_dir.")
    output_dir: str = Field(
        "runs/run", description="Run directory: config, checkpoints, final adapter, evals."
    )
    seed: int = Field(0, ge=0, description="Seed for weights init of new modules, data order and dropout.")


class ImageSection(Section):
    longest_edge: int | None = Field(
        None,
        ge=16,
        description="Resize images so the longest edge is this many px (processor 'size'). "
        "Fewer px = fewer tiles = fewer image tokens: the biggest speed lever. None = model default.",
    )
    tile_size: int | None = Field(
        None,
        ge=16,
        description="Tile edge in px (processor 'max_image_size'); must match the vision encoder.",
    )
    do_image_splitting: bool | None = Field(
        None, description="Split large images into tiles plus a global view. False = one tile per image."
    )
    min_pixels: int | None = Field(
        None,
        ge=1,
        description="Qwen families: fewest pixels an image is resized to (processor size.shortest_edge).",
    )
    max_pixels: int | None = Field(
        None,
        ge=1,
        description="Qwen families: most pixels an image is resized to (processor size.longest_edge); fewer "
        "pixels = fewer image tokens. For Qwen, longest_edge L means max_pixels L*L.",
    )
    max_patches: int | None = Field(
        None,
        ge=1,
        description="InternVL: most tiles an image is cut into (+1 thumbnail when over 1; each tile = 256 "
        "tokens at 448 px); 1 = one resized tile. Published 12. InternVL reads longest_edge L as L*L/tile^2.",
    )
    min_patches: int | None = Field(
        None, ge=1, description="InternVL: fewest tiles an image is cut into (published 1)."
    )
    min_image_tokens: int | None = Field(
        None, ge=1, description="LFM2-VL: fewest image tokens a single image/thumbnail is resized to."
    )
    max_image_tokens: int | None = Field(
        None,
        ge=1,
        description="LFM2-VL: most image tokens per single image/thumbnail; larger images are split into tiles.",
    )
    pan_and_scan: bool | None = Field(
        None,
        description="Gemma 3: also cut wide/tall images (aspect >= 1.2) into crops, 256 more tokens each "
        "(processor do_pan_and_scan). None = model default (off).",
    )
    max_crops: int | None = Field(
        None,
        ge=1,
        description="Gemma 3 pan-and-scan: most crops per image (pan_and_scan_max_num_crops; default 4).",
    )


class ModelSection(Section):
    name_or_path: str = Field(
        BUILTIN_TINY,
        description="Hub id, local directory, or an offline model built on demand: 'builtin:tiny' (SmolVLM), "
        "'builtin:tiny-qwen2.5-vl', 'builtin:tiny-qwen3-vl', 'builtin:tiny-gemma3', 'builtin:tiny-internvl', "
        "'builtin:tiny-paligemma', 'builtin:tiny-lfm2-vl' (random tiny stand-ins), 'builtin:smollm2-135m' (real "
        "SmolLM2-135M decoder + small vision tower; extra [real-decoder]).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Base weights/compute dtype (trainable weights stay float32). auto: bfloat16 on GPUs "
        "that support it, float16 on older ones (T4, V100; float32 for PaliGemma 2 and Gemma 3, which overflow "
        "float16 and refuse it), float32 on CPU.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel; sdpa is fast everywhere, flash_attention_2 needs the package."
    )
    train_vision: bool = Field(
        False, description="Also train the vision encoder (fully, or with LoRA if lora.targets has 'vision')."
    )
    image: ImageSection = Field(default_factory=ImageSection, description="Resolution and tiling of images.")
    cache_dir: str = Field(
        ".cache/vlm-tune", description="Where builtin models and synthetic data are cached."
    )
    adapter: str | None = Field(
        None,
        description="A LoRA adapter directory (an earlier run's RUN_DIR/final) to continue training instead of "
        "a new adapter, with train.stage sft or grpo. None = a new adapter on the base.",
    )


class SyntheticSection(Section):
    n_train: int = Field(2000, ge=1, description="Synthetic training rows.")
    n_test: int = Field(200, ge=1, description="Synthetic held-out rows (disjoint from train).")
    seed: int = Field(0, ge=0, description="Generator seed; same seed, same bytes.")
    image_size: int = Field(64, ge=32, description="Chart size in px.")
    min_elements: int = Field(2, ge=2, le=8, description="Fewest bars/points/slices per chart.")
    max_elements: int = Field(5, ge=2, le=8, description="Most bars/points/slices per chart.")
    chart_kinds: list[str] = Field(default_factory=lambda: ["bar"], description="bar, line, pie.")
    question_types: list[str] = Field(
        default_factory=lambda: ["count", "color_max"],
        description="count, color_max, color_min, label_max, label_min, compare, value.",
    )


class DataSection(Section):
    source: str = Field(
        SYNTHETIC,
        description="'synthetic', a hub dataset id, a save_to_disk directory, a ChartQA release directory, or a "
        ".jsonl/.json/.csv/.parquet file (tables, LLaVA or ShareGPT rows); layout found automatically.",
    )
    config_name: str | None = Field(None, description="Hub dataset config name.")
    revision: str | None = Field(None, description="Hub dataset revision.")
    train_split: str = Field("train", description="Split used for training.")
    eval_split: str = Field("test", description="Split used for evaluation.")
    columns: str | dict[str, str] = Field(
        "chartqa",
        description="Column mapping {image|images, question, answer, id, split, type, messages} "
        "or the preset 'chartqa' (image, query, label, human_or_machine).",
    )
    max_train_samples: int | None = Field(None, ge=1, description="Use only the first N training rows.")
    max_eval_samples: int | None = Field(None, ge=1, description="Use only the first N evaluation rows.")
    max_frames: int = Field(8, ge=1, description="Cap on frames taken from a video or frame folder.")
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="A row with a missing/corrupt image or empty answer: stop, or skip and count it."
    )
    on_overlong: Literal["error", "skip"] = Field(
        "error",
        description="A row longer than train.max_length: stop, or skip and count it (never truncated).",
    )
    synthetic: SyntheticSection = Field(
        default_factory=SyntheticSection, description="For source: synthetic."
    )


class PromptSection(Section):
    system: str | None = Field(None, description="System message; None = no system turn.")
    user_template: str = Field(
        "{question}\nAnswer with a single word or number.",
        description="User text; {question} is replaced by the row's question (the only placeholder; write "
        "literal braces as {{ and }}). Same in train, eval, predict.",
    )


class LoraSection(Section):
    r: int = Field(8, ge=1, description="LoRA rank; higher = more capacity and memory.")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    targets: list[str] | str = Field(
        default_factory=lambda: ["decoder", "projector"],
        description="Presets decoder, projector, vision (combine freely) or one regex over module names.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained fully and saved with the adapter (e.g. lm_head)."
    )


class TrainSection(Section):
    stage: Literal["sft", "grpo"] = Field(
        "sft",
        description="sft: supervised fine-tuning (train.*); grpo: reinforcement fine-tuning on TRL's GRPOTrainer "
        "with the chart metric as the reward (rl.*).",
    )
    method: Literal["lora", "qlora", "full"] = Field(
        "lora", description="lora, qlora (4-bit NF4 base), full."
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    batch_size: int = Field(8, ge=1, description="Per-device batch size.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Batches per optimizer step.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; None = run train.epochs.")
    epochs: float = Field(1.0, gt=0, description="Epochs when max_steps is None.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_length: int = Field(
        2048, ge=16, description="Token budget per sample; longer rows error or are skipped."
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute decoder activations: less memory, one more forward pass (frozen vision stays out).",
    )
    supervised_logits_only: bool = Field(
        True,
        description="Project to the vocabulary only where the next token is supervised: same loss, less memory.",
    )
    group_by_length: bool = Field(
        False, description="Batch rows of similar token count (less padding when images differ in tiles)."
    )
    save_steps: int = Field(100, ge=1, description="Checkpoint every N optimizer steps.")
    save_total_limit: int = Field(2, ge=1, description="Keep only the last N checkpoints.")
    logging_steps: int = Field(10, ge=1, description="Log loss and learning rate every N steps.")
    dataloader_num_workers: int | Literal["auto"] = Field(
        "auto",
        description="Processes that decode and tile images off the training loop; auto: 0 on CPU, "
        "min(4, cores - 1) with CUDA.",
    )

    @field_validator("dataloader_num_workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError("expected a whole number >= 0 or 'auto'")


class EvalSection(Section):
    batch_size: int = Field(16, ge=1, description="Generation batch size.")
    max_new_tokens: int = Field(16, ge=1, description="Generated tokens per answer.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N rows of data.eval_split.")
    every_steps: int | None = Field(
        None, ge=1, description="Generate and score during training every N steps."
    )
    subset_size: int = Field(64, ge=1, description="Rows scored during training (fixed subset).")
    select_split: str | None = Field(
        None,
        description="Split scored during training to pick the best checkpoint: a validation split (ChartQA: "
        "val). None = data.eval_split, which makes the final score optimistic (`vlm-tune check` warns).",
    )
    best_metric: Literal["exact_match", "relaxed_accuracy"] = Field(
        "exact_match", description="Metric that picks the best checkpoint during training."
    )
    baselines: list[Literal["untrained", "majority"]] = Field(
        default_factory=list, description="Also score the untrained model and a majority-answer baseline."
    )
    at_end: bool = Field(True, description="Evaluate the final model on data.eval_split after training.")
    protocol: Literal["vlm-tune", "lmms-eval", "vlmevalkit"] = Field(
        "vlm-tune",
        description="Prompt, decoding, post-processing and metric of `vlm-tune eval`, the untrained baseline and "
        "the final eval: vlm-tune (the training prompt), lmms-eval, vlmevalkit (vlm_tune/protocols.py).",
    )
    export: list[Literal["lmms-eval", "vlmevalkit"]] = Field(
        [], description="Also write these harnesses' files."
    )


class HubSection(Section):
    repo_id: str | None = Field(None, description="ORG/NAME on the hub, or a local directory path.")
    private: bool = Field(True, description="Create the hub repo as private.")
    revision: str | None = Field(None, description="Branch to push to (created if missing).")
    push_on_end: bool = Field(False, description="Push the final adapter when training ends.")


class LoggingSection(Section):
    report_to: list[Literal["none", "wandb", "tensorboard"]] = Field(
        default_factory=lambda: ["none"],
        description="Trackers: wandb (WANDB_MODE=offline works), tensorboard.",
    )
    wandb_project: str = Field("vlm-tune", description="W&B project name.")
    progress: bool = Field(True, description="Show a progress bar.")


class Config(Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    prompt: PromptSection = Field(default_factory=PromptSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    rl: RlSection = Field(default_factory=RlSection, description="The GRPO stage (train.stage: grpo).")
    eval: EvalSection = Field(default_factory=EvalSection)
    hub: HubSection = Field(default_factory=HubSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def cross_field_problems(cfg: Config) -> list[str]:
    """Rules that involve more than one key (litgpt's validate_args); all returned together."""
    problems = []
    from vlm_tune.data.chat import template_problems

    problems += template_problems(cfg.prompt.user_template)
    if cfg.hub.push_on_end and not cfg.hub.repo_id:
        problems.append("hub.push_on_end: true needs hub.repo_id (ORG/NAME or a local directory)")
    if cfg.train.method == "full" and cfg.lora.modules_to_save:
        problems.append("lora.modules_to_save: only used with train.method lora/qlora; remove it for full")
    if isinstance(cfg.lora.targets, list):
        bad = [t for t in cfg.lora.targets if t not in ("decoder", "projector", "vision")]
        if bad:
            problems.append(
                f"lora.targets: unknown preset(s) {bad}; use decoder, projector, vision, or one regex string"
            )
        if not cfg.lora.targets:
            problems.append("lora.targets: empty; name at least one of decoder, projector, vision")
    if "none" in cfg.logging.report_to and len(cfg.logging.report_to) > 1:
        problems.append("logging.report_to: 'none' cannot be combined with other trackers")
    if isinstance(cfg.data.columns, str) and cfg.data.columns != "chartqa":
        problems.append(f"data.columns: unknown preset {cfg.data.columns!r}; use 'chartqa' or a mapping")
    if isinstance(cfg.data.columns, dict):
        allowed = {"image", "images", "question", "answer", "id", "split", "type", "messages"}
        extra = sorted(set(cfg.data.columns) - allowed)
        if extra:
            problems.append(f"data.columns: unknown role(s) {extra}; allowed: {sorted(allowed)}")
    if cfg.data.source == SYNTHETIC:
        from vlm_tune.data.synthetic import CHART_KINDS, QUESTION_TYPES

        bad_q = [q for q in cfg.data.synthetic.question_types if q not in QUESTION_TYPES]
        bad_k = [k for k in cfg.data.synthetic.chart_kinds if k not in CHART_KINDS]
        if bad_q:
            problems.append(
                f"data.synthetic.question_types: unknown {bad_q}; allowed: {list(QUESTION_TYPES)}"
            )
        if bad_k:
            problems.append(f"data.synthetic.chart_kinds: unknown {bad_k}; allowed: {list(CHART_KINDS)}")
    if cfg.eval.every_steps and cfg.eval.every_steps % cfg.train.save_steps and cfg.eval.every_steps > 0:
        problems.append(
            "eval.every_steps: must be a multiple of train.save_steps so the best checkpoint can be kept"
        )
    problems += rl_problems(cfg)
    return problems


def build_config(
    raw: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = (), source: str = "config"
) -> Config:
    """Validate a raw mapping (+ overrides) into a Config, or raise ConfigError with every problem."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError([f"top level: expected a mapping of sections, got {type(raw).__name__}"], source)
    raw = apply_overrides(fix_yaml_floats(raw), overrides)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, Config), source) from None
    problems = cross_field_problems(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config and apply `section.key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    return build_config(raw, overrides, source=str(path))


def describe_schema() -> str:
    """Every key with its type, default and description (printed by `vlm-tune config --schema`)."""
    lines = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                lines.append(f"\n[{prefix}{name}]" if not prefix else f"{prefix}{name}:")
                walk(ann, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            lines.append(f"  {prefix}{name} = {default!r}  # {field.description}")

    walk(Config, "")
    return "\n".join(lines).lstrip()
