"""Training throughput: vlm-tune vs the public SmolVLM ChartQA notebook recipe (trl SFTTrainer), same job.

    python scripts/bench_train.py [--steps 60] [--batch-size 8] [--model builtin:tiny|DIR]
                                  [--longest-edge PX] [--device auto|cpu|cuda] [--warmup 10] [--repeats 3]

Both arms train the same model, on the same synthetic rows (same prompt text, same order), at the same
resolution, batch size, number of steps, learning rate and LoRA config (r 8, alpha 16, dropout 0.05 on the
decoder attention/MLP projections and the connector), each in its own subprocess so peak memory is
per arm:

* vlm-tune: `VlmTrainer` + `ChatCollator` + `training_arguments(cfg)`, wired as in `vlm_tune.train`,
  with vlm-tune's defaults (logits only where supervised; `dataloader_num_workers: auto`, i.e. 0 on CPU
  and min(4, cores - 1) with CUDA). Labels cover only the answer and its `<end_of_utterance>`.
* baseline: the recipe of the HF cookbook / smol-course "fine-tune SmolVLM on ChartQA with TRL" notebooks:
  `SFTTrainer(model, SFTConfig(..., remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset":
  True}), data_collator=collate_fn, peft_config=LoraConfig(...), processing_class=processor)` where
  `collate_fn` calls `processor.apply_chat_template(messages, tokenize=False)` and
  `processor(text=..., images=..., padding=True)` and sets `labels = input_ids` with only the pad token and
  the `<image>` token masked. Everything else is SFTConfig's default, except what must match for a
  like-for-like run: batch size, steps, learning rate/schedule, logging every step, `bf16` (False on CPU),
  `max_length` (unused: the custom collator does not truncate) and `gradient_checkpointing` (SFTConfig
  defaults it to True, the notebook sets True; here both arms use --gradient-checkpointing, default off).

Throughput is measured over steps warmup+1..steps (step-end timestamps; data loading included); the arms
run --repeats times, alternating, and the table shows each arm's median repeat (a shared CPU is noisy). Peak memory
is the arm process's peak RSS on CPU (`ru_maxrss`: model, optimizer, activations, Python and libraries) and
`torch.cuda.max_memory_allocated` on a GPU. The baseline supervises prompt and image-marker tokens too, so
its "supervised tokens/s" is larger but counts tokens that should not be trained on, and its loss is an
average over different tokens: neither is comparable with vlm-tune's. The last line is
`vlm-tune/baseline samples/s ratio: X.XX`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file, run from anywhere

import bench_harness as h  # noqa: E402
from bench_workload import vlm_trainer  # noqa: E402

ARMS = ("vlm-tune", "baseline")
# the options recorded in the JSON's "config" (with the machine)
CONFIG_KEYS = (
    "model", "steps", "warmup", "repeats", "batch_size", "longest_edge", "image_size", "dtype",
    "gradient_checkpointing", "device",
)  # fmt: skip
IGNORE = -100


def make_config(args: argparse.Namespace, output_dir: str) -> Any:
    """The vlm-tune config both arms are derived from (the baseline copies its numbers)."""
    from vlm_tune.config import build_config

    image = {"longest_edge": args.longest_edge} if args.longest_edge else {}
    return build_config(
        {
            "run": {"output_dir": output_dir, "seed": 0},
            "model": {
                "name_or_path": args.model,
                "cache_dir": args.cache_dir,
                "dtype": args.dtype,
                "image": image,
            },
            "data": {
                "source": "synthetic",
                "synthetic": {
                    "n_train": args.steps * args.batch_size,
                    "n_test": 8,
                    "image_size": args.image_size,
                },
            },
            "train": {
                "batch_size": args.batch_size,
                "max_steps": args.steps,
                "logging_steps": 1,
                "save_steps": args.steps + 1,
                "max_length": args.max_length,
                "gradient_checkpointing": args.gradient_checkpointing,
            },
            "logging": {"progress": False},
        }
    )


# ---------------------------------------------------------------------------------------------------------
# measuring


def _counting(cls: type, record: list[tuple[int, int, int]]) -> type:
    """A subclass of a Trainer that records (supervised, real, padded) tokens of every training batch."""

    class Counting(cls):  # type: ignore[misc, valid-type]
        def compute_loss(self, model: Any, inputs: dict[str, Any], *a: Any, **kw: Any) -> Any:
            if model.training:
                record.append(
                    (
                        int((inputs["labels"] != IGNORE).sum()),
                        int(inputs["attention_mask"].sum()),
                        int(inputs["input_ids"].numel()),
                    )
                )
            return super().compute_loss(model, inputs, *a, **kw)

    Counting.__name__ = f"Counting{cls.__name__}"
    return Counting


def _summarise(
    args: argparse.Namespace, times: list[float], record: list[tuple[int, int, int]], log: list[dict]
) -> dict[str, Any]:
    dt, steps, first = h.timed_window(times, args.warmup)  # steps after the warm-up
    timed = record[first : len(times)]
    sup = sum(r[0] for r in timed)
    real = sum(r[1] for r in timed)
    losses = [e["loss"] for e in log if "loss" in e]
    out = {
        "timed_steps": steps,
        "timed_s": round(dt, 3),
        "samples_per_s": steps * args.batch_size / dt,
        "supervised_tokens_per_s": sup / dt,
        "tokens_per_s": real / dt,
        "supervised_fraction": sup / max(real, 1),
        "supervised_tokens_per_sample": sup / max(steps * args.batch_size, 1),
        "tokens_per_sample": real / max(steps * args.batch_size, 1),
        "padding_fraction": 1 - real / max(sum(r[2] for r in timed), 1),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "batch_token_totals": [r[1] for r in record[: len(times)]],
    }
    out["peak_mem_mb"], out["peak_mem_kind"] = h.peak_memory()  # the GPU's, else this process's peak RSS
    return out


# ---------------------------------------------------------------------------------------------------------
# arm: vlm-tune


def run_vlm_tune(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from transformers import set_seed

    from vlm_tune.data.collate import ChatCollator
    from vlm_tune.data.sources import load_split, prepare_split
    from vlm_tune.model import load_model, load_processor, resolve_model_path, setup_training
    from vlm_tune.trainer import VlmTrainer

    t0 = time.perf_counter()
    cfg = make_config(args, str(work / "run"))
    set_seed(cfg.run.seed)
    path = resolve_model_path(cfg)
    processor = load_processor(path, cfg)
    collator = ChatCollator(processor, cfg.prompt.system, cfg.prompt.user_template, cfg.train.max_length)
    split = prepare_split(
        load_split(cfg.data, "train", cfg.model.cache_dir),
        "error",
        "error",
        cfg.train.max_length,
        processor,
        collator,
    )
    model = setup_training(load_model(path, cfg), cfg)
    record: list[tuple[int, int, int]] = []
    timer = h.step_timer("cuda" if torch.cuda.is_available() else "cpu")
    trainer_cls = _counting(VlmTrainer, record)
    trainer = vlm_trainer(trainer_cls, cfg, model, work / "run", split, collator, processor, timer)
    setup_s = time.perf_counter() - t0
    trainer.train()
    out = _summarise(args, timer.times, record, trainer.state.log_history)
    out["setup_s"] = setup_s
    out["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return out


# ---------------------------------------------------------------------------------------------------------
# arm: baseline (the notebook recipe)


def notebook_collate_fn(processor: Any, user_template: str) -> Any:
    """The cookbook's collate_fn: chat template → processor → labels = input_ids minus pad and <image>."""
    # the notebook reads additional_special_tokens_ids[additional_special_tokens.index("<image>")];
    # transformers 5 tokenizers no longer have that attribute, so look the id up directly (same id)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")

    def collate_fn(examples: list[dict[str, Any]]) -> Any:
        texts, images = [], []
        for example in examples:
            image = example["image"]
            if image.mode != "RGB":
                image = image.convert("RGB")
            messages = [  # same prompt text as vlm-tune's (no system turn, same user template)
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": user_template.format(question=example["query"])},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": example["label"][0]}]},
            ]
            texts.append(processor.apply_chat_template(messages, tokenize=False))
            images.append([image])
        batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
        labels = batch["input_ids"].clone()
        labels[labels == processor.tokenizer.pad_token_id] = IGNORE  # mask padding tokens in labels
        labels[labels == image_token_id] = IGNORE  # mask image token ids in labels
        batch["labels"] = labels
        return batch

    return collate_fn


def run_baseline(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from vlm_tune.data.sources import load_split
    from vlm_tune.model import DTYPES, apply_image_settings, lora_target_regex, resolve_model_path

    t0 = time.perf_counter()
    cfg = make_config(args, str(work / "run"))  # the numbers to match; none of vlm-tune's machinery
    path = resolve_model_path(cfg)
    processor = AutoProcessor.from_pretrained(path)
    apply_image_settings(processor, cfg)  # same resolution as the vlm-tune arm
    train_dataset = load_split(cfg.data, "train", cfg.model.cache_dir).dataset
    train_dataset = train_dataset.cast_column("image", datasets.Image())  # decoded PIL images, as on the hub
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=DTYPES[cfg.model.dtype], attn_implementation=cfg.model.attn_implementation
    )
    peft_config = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_target_regex(cfg.lora.targets),
        task_type="CAUSAL_LM",
    )
    use_cuda = torch.cuda.is_available()
    t = cfg.train
    sft_args = SFTConfig(
        output_dir=str(work / "run"),
        per_device_train_batch_size=t.batch_size,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        logging_steps=1,
        save_strategy="no",
        seed=cfg.run.seed,
        bf16=cfg.model.dtype == "bfloat16" and use_cuda,
        max_length=t.max_length,
        gradient_checkpointing=t.gradient_checkpointing,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        report_to=[],
        disable_tqdm=True,
        use_cpu=not use_cuda,
    )
    collate_fn = notebook_collate_fn(processor, cfg.prompt.user_template)
    record: list[tuple[int, int, int]] = []
    timer = h.step_timer("cuda" if use_cuda else "cpu")
    trainer = _counting(SFTTrainer, record)(
        model=model,
        args=sft_args,
        train_dataset=train_dataset,
        data_collator=collate_fn,
        peft_config=peft_config,
        processing_class=processor,
        callbacks=[timer],
    )
    setup_s = time.perf_counter() - t0
    trainer.train()
    out = _summarise(args, timer.times, record, trainer.state.log_history)
    out["setup_s"] = setup_s
    out["trainable_params"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    out["masking"] = masking_analysis(processor, cfg, train_dataset, collate_fn)
    return out


def masking_analysis(processor: Any, cfg: Any, dataset: Any, collate_fn: Any) -> dict[str, Any]:
    """What the baseline supervises, token by token, against vlm-tune's answer-only labels (same rows)."""
    from vlm_tune.data.collate import ChatCollator, image_token_ids

    rows = [dataset[i] for i in range(min(len(dataset), 4 * cfg.train.batch_size))]
    canonical = [
        {"id": r["id"], "images": [r["image"].convert("RGB")], "question": r["query"], "answers": r["label"]}
        for r in rows
    ]
    ours = ChatCollator(processor, cfg.prompt.system, cfg.prompt.user_template)
    base_batch = collate_fn(rows)
    our_batch = ours(canonical)
    same_inputs = bool((base_batch["input_ids"] == our_batch["input_ids"]).all())
    base_sup = base_batch["labels"] != IGNORE
    answer = our_batch["labels"] != IGNORE
    markers = sum(base_batch["input_ids"] == i for i in image_token_ids(processor)).bool()
    tok = processor.tokenizer
    newline = base_batch["input_ids"] == tok.convert_tokens_to_ids(tok.tokenize("\n"))[0]
    n = len(rows)
    sup_ids = base_batch["input_ids"][base_sup & ~answer & ~markers]
    top = {}
    for i in sup_ids.unique().tolist():
        top[tok.convert_ids_to_tokens(i)] = int((sup_ids == i).sum())
    top = dict(sorted(top.items(), key=lambda kv: -kv[1])[:8])
    return {
        "rows": n,
        "same_input_ids_as_vlm_tune": same_inputs,
        "baseline_supervised_per_row": float(base_sup.sum()) / n,
        "answer_tokens_per_row": float(answer.sum()) / n,
        "answer_tokens_also_supervised_by_baseline": bool((answer <= base_sup).all()),
        "image_marker_tokens_supervised_per_row": float((base_sup & markers).sum()) / n,
        "prompt_text_tokens_supervised_per_row": float((base_sup & ~answer & ~markers).sum()) / n,
        "trailing_newline_after_answer_supervised": bool((base_sup & newline & ~answer).any()),
        "answer_share_of_baseline_supervision": float(answer.sum()) / max(float(base_sup.sum()), 1.0),
        "most_supervised_non_answer_tokens": top,
    }


# ---------------------------------------------------------------------------------------------------------
# parent: prepare once, run each arm in its own process, report


def _arm_main(args: argparse.Namespace) -> None:
    h.quiet()
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.arm}-") as tmp:
        fn = run_vlm_tune if args.arm == "vlm-tune" else run_baseline
        result = fn(args, Path(tmp))
    h.write_result(args, result)


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model and the synthetic data once so neither arm pays for it."""
    from vlm_tune.data.sources import load_split
    from vlm_tune.model import resolve_model_path

    cfg = make_config(args, "unused")
    path = resolve_model_path(cfg)
    load_split(cfg.data, "train", cfg.model.cache_dir)
    return {"model_path": path}


def _default_image_size(model: str) -> int:
    """Synthetic chart size: 64 px for the tiny model, else the model's tile size (512 / 384 px)."""
    if model == "builtin:tiny":
        return 64
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        path = Path(model) / name
        if path.is_file():
            conf = json.loads(path.read_text())
            conf = conf.get(key, {}) if key else conf
            tile = (conf.get("max_image_size") or {}).get("longest_edge")
            if tile:
                return min(int(tile), 1024)
    return 384


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]], machine: str) -> None:
    header = (
        f"{'arm':<10} {'samples/s':>9} {'sup.tok/s':>10} {'tokens/s':>9} {'sup.frac':>8} "
        f"{'peak MB':>8} {'1st loss':>8} {'final loss':>10} {'setup s':>7}"
    )
    print()
    print(
        f"model {args.model}, synthetic {args.image_size}px charts, longest_edge {args.longest_edge or 'model default'}, "
        f"batch {args.batch_size}, {args.steps} steps ({args.warmup} warm-up not timed) x {args.repeats} repeats, dtype {args.dtype}, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; {machine}"
    )
    print(header)
    print("-" * len(header))
    for arm, r in results.items():
        print(
            f"{arm:<10} {r['samples_per_s']:>9.2f} {r['supervised_tokens_per_s']:>10.1f} {r['tokens_per_s']:>9.0f} "
            f"{r['supervised_fraction']:>8.3f} {r['peak_mem_mb']:>8.0f} {h.fmt(r['first_loss'], '.4f'):>8} "
            f"{h.fmt(r['final_loss'], '.4f'):>10} {r['setup_s']:>7.1f}"
        )
    m = results.get("baseline", {}).get("masking")
    same = results["vlm-tune"]["batch_token_totals"] == results.get("baseline", {}).get("batch_token_totals")
    print()
    for arm, r in results.items():
        print(f"{arm} samples/s in each repeat: {r['samples_per_s_repeats']} (table: the median repeat)")
    print(f"same batches in both arms (tokens per step): {same}")
    print(f"peak memory: {results['vlm-tune']['peak_mem_kind']} of each arm's process")
    if m:
        print(
            "NOTE: the baseline's 'supervised tokens/s' is higher but wrong: it trains on "
            f"{m['baseline_supervised_per_row']:.1f} tokens per row, of which only {m['answer_tokens_per_row']:.1f} "
            f"are the answer (+ its <end_of_utterance>) = {100 * m['answer_share_of_baseline_supervision']:.1f}%. "
            f"The rest: {m['prompt_text_tokens_supervised_per_row']:.1f} prompt-text tokens (question, role names, "
            f"the user's <end_of_utterance>, the newline after the answer) and "
            f"{m['image_marker_tokens_supervised_per_row']:.1f} image-marker tokens (<fake_token_around_image>, "
            "<global-img>, <row_i_col_j>) per row. Its loss averages over those tokens, so its loss value is not "
            "comparable with vlm-tune's either."
        )
        print(
            f"baseline's most supervised non-answer tokens (first {m['rows']} rows): {m['most_supervised_non_answer_tokens']}"
        )
        print(f"same input_ids from both collators on the same rows: {m['same_input_ids_as_vlm_tune']}")
    print()
    blob = {
        "config": {**{k: getattr(args, k) for k in CONFIG_KEYS}, "machine": machine},
        "results": {
            k: {kk: vv for kk, vv in v.items() if kk != "batch_token_totals"} for k, v in results.items()
        },
    }
    if "baseline" in results:
        keys = ("samples_per_s", "tokens_per_s", "peak_mem_mb")
        blob["ratios"] = h.ratios(results["vlm-tune"], results["baseline"], keys)
        print(
            "vlm-tune/baseline ratios: "
            + ", ".join(f"{k} {v:.2f}" for k, v in blob["ratios"].items())
            + " (peak memory: lower is better)"
        )
    print(h.json_line(blob))
    if args.json:
        h.write_json(args.json, blob, sort_keys=True)
    if "baseline" in results:
        print(h.ratio_line("vlm-tune", "baseline", "samples/s", blob["ratios"]["samples_per_s"]))


def _run_arm(args: argparse.Namespace, arm: str) -> dict[str, Any]:
    """One arm in a fresh process of this script (its peak memory is its own); its result."""
    child = h.run_isolated(
        __file__, [*sys.argv[1:], "--arm", arm, "--image-size", str(args.image_size), "--dtype", args.dtype]
    )
    if child.returncode != 0:
        print(child.stdout[-3000:], child.stderr[-6000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"arm {arm} failed (exit {child.returncode})")
    return child.result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per arm (default 60)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--model", default="builtin:tiny", help="builtin:tiny or a model dir (e.g. from shapes.py)"
    )
    ap.add_argument("--longest-edge", type=int, default=None, help="processor longest_edge; default: model's")
    ap.add_argument(
        "--image-size", type=int, default=None, help="synthetic chart px (default: 64 / tile size)"
    )
    ap.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None, help="default: cpu fp32, cuda bf16"
    )
    ap.add_argument("--gradient-checkpointing", action="store_true", help="in both arms")
    ap.add_argument("--max-length", type=int, default=4096)
    h.add_bench_options(
        ap,
        warmup=10,
        repeats=3,
        repeats_help="runs per arm, alternating; median reported",
        json_flag="--json",
    )
    ap.add_argument("--arm", choices=ARMS, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error("--steps must be larger than --warmup")
    if args.image_size is None:
        args.image_size = _default_image_size(args.model)
    on_cuda = h.resolve_device(ap, args.device) == "cuda"
    import torch

    if args.dtype is None:
        args.dtype = "bfloat16" if on_cuda else "float32"
    if args.arm:
        _arm_main(args)
        return

    h.quiet()
    t0 = time.perf_counter()
    _prepare(args)
    machine = h.device_name("cuda") if on_cuda else f"{os.cpu_count()}-core CPU, torch {torch.__version__}"

    def progress(arm: str, rep: int, seconds: float, result: dict[str, Any]) -> None:
        print(
            f"[bench] repeat {rep + 1}/{args.repeats} {arm}: {result['samples_per_s']:.2f} samples/s "
            f"({seconds:.0f} s in its process)",
            flush=True,
        )

    # arms alternate, so a slow spell on a shared machine hits both
    arms = {arm: (lambda arm=arm: _run_arm(args, arm)) for arm in ARMS}
    runs = h.alternate(arms, args.repeats, on_run=progress)
    results = {
        arm: h.aggregate_repeats([r for _, r in rs], "samples_per_s", "peak_mem_mb")
        for arm, rs in runs.items()
    }
    print(f"[bench] total {time.perf_counter() - t0:.0f} s")
    report(args, results, machine)


if __name__ == "__main__":
    main()
