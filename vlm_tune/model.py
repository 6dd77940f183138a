"""Load the model and processor (hub id, local directory or the builtin tiny model) and set up training.

LoRA targets are an explicit, inspectable regex built from the model family's presets
(`vlm_tune.families.<family>`; SmolVLM's: decoder = model.text_model.layers.N.{self_attn,mlp}.*_proj,
projector = model.connector.modality_projection.proj, vision = model.vision_model.encoder.layers.N.*).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from vlm_tune.config import BUILTIN_TINY, Config
from vlm_tune.errors import UserError
from vlm_tune.families import (
    Family,
    family_by_builtin,
    family_of_config,
    family_of_model,
    family_of_processor,
)
from vlm_tune.families import (
    apply_image_settings as apply_family_image_settings,
)
from vlm_tune.families.smolvlm import TARGET_PRESETS, VISION_MODULE  # noqa: F401  (SmolVLM's, re-exported)
from vlm_tune.runtime import (  # noqa: F401 (DTYPES: scripts)
    DTYPES,
    Runtime,
    cast_trainable_to_fp32,
    for_config,
    fsdp_launch,
)
from vlm_tune.standins.real_decoder import BUILTIN_SMOLLM2


def lora_target_regex(targets: list[str] | str, presets: dict[str, str] | None = None) -> str:
    """Presets (combined; SmolVLM's unless a family's are given) or a user regex → one full-match regex."""
    if isinstance(targets, str):
        return targets
    presets = presets or TARGET_PRESETS
    return r"(.*\.)?(" + "|".join(presets[t] for t in targets) + r")"


def resolve_model_path(cfg: Config) -> str:
    """builtin:tiny[-FAMILY] / builtin:smollm2-135m → a locally built model (cached); a local dir as is; a hub
    id checked offline first."""
    name = cfg.model.name_or_path
    if name == BUILTIN_TINY:
        from vlm_tune.families.smolvlm import ensure_tiny_model

        return str(ensure_tiny_model(Path(cfg.model.cache_dir) / "tiny-model"))
    if name == BUILTIN_SMOLLM2:
        from vlm_tune.standins.real_decoder import ensure_real_decoder_model

        return str(ensure_real_decoder_model(Path(cfg.model.cache_dir) / "smollm2-135m"))
    if name.startswith("builtin:"):
        fam = family_by_builtin(name)
        if fam is None:
            from vlm_tune.families import all_families

            known = ", ".join([f.builtin for f in all_families()] + [BUILTIN_SMOLLM2])
            raise UserError(f"model.name_or_path: unknown builtin model {name!r}; builtin models: {known}")
        return str(fam.build_stand_in(Path(cfg.model.cache_dir) / name.removeprefix("builtin:")))
    if Path(name).exists():
        if not (Path(name) / "config.json").is_file() and not (Path(name) / "adapter_config.json").is_file():
            raise UserError(f"model.name_or_path: {name} is a directory without config.json")
        return name
    if name.startswith((".", "/")) or name.count("/") != 1:
        raise UserError(
            f"model.name_or_path: {name!r} is neither an existing directory nor a hub id (ORG/NAME)"
        )
    _check_hub_model_available(name, cfg.model.revision)
    return name


def _check_hub_model_available(repo_id: str, revision: str | None) -> None:
    """Fail at once, naming the id and the fix, when offline and the model is not cached."""
    from huggingface_hub import constants, try_to_load_from_cache

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0") in ("1", "true", "True")
    if not offline:
        return
    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(cached, str):
        raise UserError(
            f"model {repo_id!r} is not in the local cache and HF_HUB_OFFLINE=1 is set. Download it on a connected "
            f"machine (`hf download {repo_id}`) and copy the cache here, or save it with save_pretrained and set "
            "model.name_or_path to that directory."
        )


def load_processor(path: str, cfg: Config) -> Any:
    """The family's processor with model.image settings applied to the image processor."""
    from vlm_tune.families import load_processor as load_family_processor

    processor = load_family_processor(path, cfg.model.revision)
    apply_image_settings(processor, cfg)
    return processor


def apply_image_settings(processor: Any, cfg: Config) -> None:
    """model.image → the image processor, translated by the processor's family (SmolVLM: longest edge, tiles)."""
    apply_family_image_settings(family_of_processor(processor), processor, cfg.model.image)


def model_family(path: str, cfg: Config) -> Family:
    """The family of the model at path (from its config); an unsupported architecture → UserError."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.model.revision)
    except (OSError, ValueError) as err:
        raise UserError(f"model {path!r}: its config could not be read: {err}") from None
    return family_of_config(config)


def quantization_config(compute_dtype: torch.dtype, fam: Family | None = None) -> Any:
    """4-bit NF4 (double quantization) for the decoder; the family's vision tower, projector and the head stay
    unquantized (SmolVLM's names when no family is given)."""
    from transformers import BitsAndBytesConfig

    skip = [fam.vision_module, *fam.projector_modules] if fam else [VISION_MODULE, "model.connector"]

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
        # small layers break the CPU 4-bit path
        llm_int8_skip_modules=[*skip, "lm_head"],
    )


def load_model(path: str, cfg: Config, rt: Runtime | None = None) -> Any:
    """The base model in the resolved dtype, on the runtime's device; 4-bit NF4 for qlora. Under an FSDP
    launch it stays where from_pretrained put it (CPU, or meta on ranks > 0 with cpu_ram_efficient_loading):
    accelerate moves each rank's shard, never the whole model, onto its GPU."""
    from transformers import AutoModelForImageTextToText

    fam = model_family(path, cfg)
    rt = rt or for_config(cfg)
    kwargs: dict[str, Any] = {"dtype": rt.torch_dtype, "revision": cfg.model.revision}
    kwargs["attn_implementation"] = fam.attn_implementation(cfg.model.attn_implementation)
    quantized = cfg.train.method == "qlora"
    if quantized:
        from vlm_tune.quiet import four_bit_in_use

        four_bit_in_use()
        kwargs["quantization_config"] = quantization_config(rt.torch_dtype, fam)
        # 4-bit weights are placed on the device while loading and never moved after
        kwargs["device_map"] = {"": str(rt.device)}
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except OSError as err:
        raise UserError(f"model {path!r} could not be loaded: {err}") from None
    if quantized or fsdp_launch():  # 4-bit: placed while loading; FSDP: accelerate shards it onto the GPUs
        return model
    return model.to(rt.device)


def setup_training(model: Any, cfg: Config) -> Any:
    """Freeze/unfreeze by method; wrap in LoRA when asked; checkpointing if asked. Returns the model to train.

    Trainable parameters become float32 whatever model.dtype is (autocast runs the matmuls in the base dtype).
    """
    method = cfg.train.method
    fam = family_of_model(model)
    if method == "full":
        for name, p in model.named_parameters():
            tower = name.startswith(fam.vision_module) and not name.startswith(fam.projector_modules)
            p.requires_grad = cfg.model.train_vision or not tower
        cast_trainable_to_fp32(model)
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return model
    from peft import LoraConfig, get_peft_model

    modules_to_save = list(cfg.lora.modules_to_save)
    targets = cfg.lora.targets
    if cfg.model.train_vision and not (isinstance(targets, list) and "vision" in targets):
        # vision tower (not the projector) trained fully, saved with the adapter
        modules_to_save += fam.vision_save_modules(model)
    if fam.full_projector and isinstance(targets, list) and "projector" in targets:
        # a projector without nn.Linear layers (Gemma 3) is trained fully instead of through LoRA
        modules_to_save += list(fam.full_projector)
        targets = [t for t in targets if t != "projector"]
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_target_regex(targets, fam.target_presets),
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    if method == "qlora":
        for p in model.parameters():
            p.requires_grad = False
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as err:
        raise UserError(f"lora.targets {targets!r} matched no module: {err}") from None
    cast_trainable_to_fp32(peft_model)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(peft_model)
    return peft_model


def continue_adapter(model: Any, cfg: Config) -> Any:
    """The base with model.adapter loaded trainable: its LoRA continued (as `setup_training` would wrap it)."""
    from peft import PeftModel

    path = Path(cfg.model.adapter or "")
    if not (path / "adapter_config.json").is_file():
        raise UserError(
            f"model.adapter: {path} holds no adapter_config.json (expected an earlier run's RUN_DIR/final)"
        )
    peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=True)
    cast_trainable_to_fp32(peft_model)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(peft_model)
    return peft_model


def enable_gradient_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing, without transformers' input-embedding grad hooks.

    transformers hooks the input embeddings of every sub-model when checkpointing is turned on (reentrant
    checkpointing needs inputs that require grad). In a VLM that includes the vision tower's patch embeddings,
    so a frozen tower joins the autograd graph: its backward runs and, being checkpointed, its forward runs
    twice (2.3x slower than without the hooks on the 256M shape, CPU). Non-reentrant checkpointing needs no
    such hook, so we remove them.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    base.config.use_cache = False
    if hasattr(base, "activation_checkpointing_enable"):  # newer transformers 5.x; the old name is deprecated
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.disable_input_require_grads()


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights counted by their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def lora_module_names(model: Any) -> list[str]:
    """Names of modules that received LoRA layers (for inspection and tests)."""
    return sorted({re.sub(r"\.lora_[AB].*$", "", n) for n, _ in model.named_parameters() if ".lora_A." in n})
