"""Using a trained adapter: evaluate it, answer questions with it, merge it into its base model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from vlm_tune.artifacts import make_portable
from vlm_tune.config import Config
from vlm_tune.data.chat import load_prompt
from vlm_tune.data.collate import make_collator
from vlm_tune.errors import UserError
from vlm_tune.protocols import check_answer_format


def _resolve_adapter(adapter: str) -> Path:
    """A local adapter directory, or a hub repo id downloaded (from cache when offline)."""
    path = Path(adapter)
    if path.is_dir():
        return path
    if path.exists() or adapter.startswith((".", "/")) or adapter.count("/") != 1:
        raise UserError(f"--adapter {adapter}: not an adapter directory or a hub repo id (ORG/NAME)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(adapter))
    except Exception as err:
        raise UserError(
            f"--adapter {adapter}: could not download ({type(err).__name__}: {err}). Offline? Download it on a "
            "connected machine and pass the directory."
        ) from None


def load_for_inference(
    adapter: str | Path, dtype: str | None = None, for_merge: bool = False
) -> tuple[Any, Any, dict[str, Any]]:
    """(model with adapter, processor, prompt contract) from an adapter directory written by vlm-tune.

    The prompt contract holds system, user_template and answer_format (plain when an older prompt.json lacks it).

    The model is on the runtime's device (`vlm_tune.runtime`) in `dtype` (default: the run's model.dtype from
    the saved config.yaml where this machine can run it, else auto; an explicit dtype must run here). A QLoRA
    adapter gets the 4-bit base it was trained on, except `for_merge` (merging needs the unquantized weights).
    """
    from transformers import AutoModelForImageTextToText

    from vlm_tune.families import family_of_processor
    from vlm_tune.families import load_processor as load_family_processor
    from vlm_tune.model import quantization_config
    from vlm_tune.runtime import hardware, precision_problems, resolve

    path = _resolve_adapter(str(adapter))
    prompt = load_prompt(path)
    if prompt is None:
        raise UserError(f"{path}: no prompt.json; this is not an adapter directory written by vlm-tune")
    check_answer_format(prompt["answer_format"], f"{path / 'prompt.json'}: answer_format")
    processor = load_family_processor(str(path))
    saved = _apply_saved_image_settings(processor, path)
    quantized = saved is not None and saved.train.method == "qlora" and not for_merge
    method = "qlora" if quantized else "lora"
    family = family_of_processor(processor)  # its precision rule (e.g. PaliGemma 2: never float16)
    if dtype is None:  # the run's dtype where this machine can run it (a T4's float16 on a CPU: auto instead)
        dtype = saved.model.dtype if saved else "auto"
        if precision_problems(dtype, method, hardware(), family):
            dtype = "auto"
    rt = resolve(dtype, method, family=family)
    kwargs: dict[str, Any] = {"dtype": rt.torch_dtype}
    if quantized:
        from vlm_tune.quiet import four_bit_in_use

        four_bit_in_use()
        kwargs |= {
            "quantization_config": quantization_config(rt.torch_dtype, family),
            "device_map": {"": str(rt.device)},
        }
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base_id = _check_base_available(path)
        try:
            base = AutoModelForImageTextToText.from_pretrained(base_id, **kwargs)
        except OSError as err:
            raise UserError(f"{path}: base model {base_id!r} could not be loaded: {err}") from None
        model = PeftModel.from_pretrained(base, path)
    else:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    if not quantized:
        model = model.to(rt.device)
    model.eval()
    return model, processor, prompt


def _check_base_available(adapter_dir: Path) -> str:
    """The adapter's base model id or path, checked like train checks model.name_or_path (offline cache)."""
    from vlm_tune.model import _check_hub_model_available

    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base_id = adapter_cfg["base_model_name_or_path"]
    if Path(base_id).exists():
        return base_id
    if base_id.startswith((".", "/")) or base_id.count("/") != 1:
        raise UserError(
            f"{adapter_dir}: base model {base_id!r} not found; set base_model_name_or_path in its "
            "adapter_config.json to a local copy of the base model"
        )
    _check_hub_model_available(base_id, adapter_cfg.get("revision"))
    return base_id


def _apply_saved_image_settings(processor: Any, path: Path) -> Config | None:
    """The run's model.image settings (saved in config.yaml next to the adapter) reach the processor.

    Returns that config (None when the directory has none)."""
    cfg_path = path / "config.yaml"
    if not cfg_path.is_file():
        return None
    from vlm_tune.config import load_config
    from vlm_tune.model import apply_image_settings

    cfg = load_config(cfg_path)
    apply_image_settings(processor, cfg)
    return cfg


def run_eval(
    cfg: Config,
    adapter: str | None = None,
    base: bool = False,
    split: str | None = None,
    limit: int | None = None,
    name: str | None = None,
    protocol: str | None = None,
    export: list[str] | None = None,
) -> dict[str, Any]:
    """`vlm-tune eval`: score the adapter (default RUN_DIR/final) or the base model on a split.

    `protocol` / `export` (default eval.protocol / eval.export): see `vlm_tune.protocols`. With --base the prompt
    contract is the config's prompt section and answer format (a plain hub model: the zero-shot number before
    fine-tuning); an adapter is scored in the answer format its prompt.json saved."""
    from vlm_tune.data.sources import LazyRows, load_split, prepare_split
    from vlm_tune.evaluate import evaluate
    from vlm_tune.model import load_model, load_processor, resolve_model_path
    from vlm_tune.rl_config import run_answer_format
    from vlm_tune.runtime import for_config

    run_dir = Path(cfg.run.output_dir)
    rt = for_config(cfg)  # precision problems fail here, before any loading
    if base:
        model_path = resolve_model_path(cfg)
        processor = load_processor(model_path, cfg)
        model = load_model(model_path, cfg, rt)
        system, template, answer_format = cfg.prompt.system, cfg.prompt.user_template, run_answer_format(cfg)
    else:
        adapter = adapter or str(run_dir / "final")
        if not Path(adapter).exists() and adapter == str(run_dir / "final"):
            raise UserError(f"no adapter at {adapter}: train first, pass --adapter DIR, or use --base")
        model, processor, prompt = load_for_inference(adapter, cfg.model.dtype)
        system, template, answer_format = prompt["system"], prompt["user_template"], prompt["answer_format"]
    collator = make_collator(processor, system, template)
    split = split or cfg.data.eval_split
    prepared = prepare_split(
        load_split(cfg.data, split, cfg.model.cache_dir),
        cfg.data.on_bad_row,
        "skip",
        limit=limit or cfg.eval.limit,
    )
    out = run_dir / "eval" / (name or ("base" if base else "final"))
    return evaluate(
        model,
        processor,
        collator,
        LazyRows.of(prepared),  # images decoded per generation batch
        out,
        cfg.eval.batch_size,
        cfg.eval.max_new_tokens,
        extra={"split": split, "skipped": dict(prepared.skipped)},
        progress=f"eval {out.name}" if cfg.logging.progress else None,
        protocol=protocol or cfg.eval.protocol,
        export=cfg.eval.export if export is None else export,
        workers=cfg.train.dataloader_num_workers,
        answer_format=answer_format,
    )


def predict(
    model: Any,
    processor: Any,
    prompt: dict[str, Any],
    items: list[dict[str, Any]],
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> list[str]:
    """Answers for items of {images: [PIL], question: str}, through the saved prompt contract; a tagged answer
    format gives the text inside the last `<answer>...</answer>` ("" without one), as evaluation scores it."""
    from vlm_tune.evaluate import generate_answers

    collator = make_collator(processor, prompt["system"], prompt["user_template"])
    rows = [
        {"id": str(i), "images": it["images"], "question": it["question"], "answers": [""]}
        for i, it in enumerate(items)
    ]
    if prompt.get("answer_format", "plain") != "tagged":
        return generate_answers(model, processor, collator, rows, batch_size, max_new_tokens)
    return generate_answers(
        model, processor, collator, rows, batch_size, max_new_tokens, postprocess=_tagged_answer
    )


def _tagged_answer(raw: str) -> str:
    """The answer of a tagged generation as evaluation scores it ("" without tags)."""
    from vlm_tune.protocols import answer_of

    return answer_of(raw, "tagged") or ""


def predict_cli(args: Any) -> int:
    """`vlm-tune predict`: one question (--image/--frames + --question) or a JSONL batch (--batch)."""
    from vlm_tune.data.sources import BadRow, expand_images

    items: list[dict[str, Any]] = []
    if args.batch:
        path = Path(args.batch)
        if not path.is_file():
            raise UserError(f"--batch {path}: file not found")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"--batch {path}: line {n} is not JSON ({err})") from None
            images = obj.get("images") or obj.get("image") or obj.get("frames")
            if not images or not obj.get("question"):
                raise UserError(
                    f"--batch {path}: line {n} needs 'image' (or 'images'/'frames') and 'question'"
                )
            items.append(
                {
                    "images": expand_images(images, path.parent, 64, f"line {n}", "image"),
                    "question": obj["question"],
                    "id": obj.get("id", str(n)),
                }
            )
    else:
        if not args.question:
            raise UserError("predict needs --question (or --batch FILE)")
        if not args.image and not args.frames:
            raise UserError("predict needs --image PATH (repeatable) or --frames DIR")
        inputs = [("--image", p) for p in args.image] + ([("--frames", args.frames)] if args.frames else [])
        images = []
        for flag, value in inputs:
            try:
                images += expand_images(value, None, 64, "input", flag)
            except BadRow as err:  # names the file: "--image x.png: image file x.png cannot be decoded (...)"
                raise UserError(f"{flag} {value}: {err.detail}") from None
        items.append({"images": images, "question": args.question, "id": "0"})
    from vlm_tune.runtime import compute_dtype, dtype_name, tensor_devices

    model, processor, prompt = load_for_inference(args.adapter)
    answers = predict(model, processor, prompt, items, args.max_new_tokens)
    where = {"devices": tensor_devices(model), "dtype": dtype_name(compute_dtype(model))}
    for item, answer in zip(items, answers, strict=True):
        if args.json or args.batch:
            print(json.dumps({"id": item["id"], "question": item["question"], "answer": answer} | where))
        else:
            print(answer)
    return 0


def merge(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge a LoRA adapter into its base weights; the result loads with plain transformers."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(
            f"{adapter_dir}: no adapter_config.json; pass a LoRA adapter directory (RUN_DIR/final)"
        )
    from vlm_tune.runtime import compute_dtype, dtype_name, tensor_devices

    model, processor, _ = load_for_inference(adapter_dir, for_merge=True)  # on the runtime's device
    merged = model.merge_and_unload()
    # where the merge ran (every parameter's device, the compute dtype): merged/merge.json
    record = {"adapter": str(adapter_dir), "devices": tensor_devices(merged)}
    record["dtype"] = dtype_name(compute_dtype(merged))
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    (tmp / "merge.json").write_text(json.dumps(record, indent=2) + "\n")
    processor.save_pretrained(tmp)
    make_portable(tmp)
    for name in ("prompt.json", "config.yaml"):
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, tmp / name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
