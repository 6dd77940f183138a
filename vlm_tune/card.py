"""The model card of a finished run: README.md text with YAML metadata, the prompt contract, the metrics, the
training settings, the software versions and a loading snippet (`vlm_tune.card_snippet`).

`build_model_card(run_dir, repo_id, merged)` is deterministic: same run, same card bytes. `read_run` and
`run_evals` read what a finished run holds (also used by `vlm_tune.hub` to pick the files it uploads).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from vlm_tune.card_snippet import model_card_snippet
from vlm_tune.errors import UserError
from vlm_tune.families import Family, family_of_processor_class, saved_processor_class

TAGS = ["vlm-tune", "lora", "chart-qa", "smolvlm", "image-text-to-text"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt", ".tsv", ".zip", ".tar", ".gz")
_EVAL_NOTES = {
    "final": "this model",
    "untrained": "the base model without the adapter, same prompt",
    "majority": "always the most frequent training answer per question type",
    "base": "the base model without the adapter, same prompt",
}


# --------------------------------------------------------------------------------------------- the run dir
def read_run(run_dir: Path) -> dict[str, Any]:
    """config, adapter_config (or {}), prompt contract of a finished run; UserError naming the fix if not."""
    final = run_dir / "final"
    if not run_dir.is_dir():
        raise UserError(
            f"{run_dir}: no such run directory; pass the folder a training run wrote (it holds final/)"
        )
    if not final.is_dir():
        if (run_dir / "prompt.json").is_file() and run_dir.name == "final":
            raise UserError(
                f"{run_dir} is the final/ folder itself; pass the run directory above it: {run_dir.parent}"
            )
        raise UserError(
            f"{final} not found: this run has not finished. Train first (`vlm-tune train CONFIG`) or pass "
            "the run directory of a finished run (the folder that holds final/)"
        )
    if not (final / "prompt.json").is_file():
        raise UserError(
            f"{final / 'prompt.json'} missing: the prompt contract is required to publish a model. Re-run "
            'training, or write it: {"system": null, "user_template": "{question}\\n..."}'
        )
    has_adapter = (final / "adapter_config.json").is_file()
    if not has_adapter and not (final / "config.json").is_file():
        raise UserError(
            f"{final}: neither adapter_config.json (LoRA) nor config.json (full model); re-run training"
        )
    cfg_path = final / "config.yaml" if (final / "config.yaml").is_file() else run_dir / "config.yaml"
    try:
        cfg = (yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else None) or {}
        adapter = json.loads((final / "adapter_config.json").read_text()) if has_adapter else {}
        prompt = json.loads((final / "prompt.json").read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise UserError(f"{run_dir}: a run file does not parse ({err}); re-run training") from None
    if not isinstance(prompt, dict) or "user_template" not in prompt:
        raise UserError(f"{final / 'prompt.json'}: needs keys system and user_template; re-run training")
    return {"cfg": cfg, "adapter": adapter, "prompt": prompt, "config_path": cfg_path}


def _run_family(final: Path) -> Family:
    """The family of a finished run, from the processor class saved beside its adapter or model."""
    cls = saved_processor_class(str(final))
    if cls:
        return family_of_processor_class(cls)
    raise UserError(f"{final}: no processor_config.json naming the processor class; re-run training")


def run_evals(run_dir: Path) -> dict[str, dict[str, Any]]:
    """eval name → metrics, `final` first, then the rest by name."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((run_dir / "eval").glob("*/metrics.json")):
        try:
            found[path.parent.name] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err}); re-run `vlm-tune eval` or delete it") from None
    return {name: found[name] for name in sorted(found, key=lambda n: (n != "final", n))}


def _is_hub_id(name: Any) -> bool:
    """ORG/NAME that is not a local path or a data file."""
    if not isinstance(name, str) or not _HUB_ID.match(name) or ".." in name or "--" in name:
        return False
    return not name.lower().endswith(_DATA_SUFFIXES) and not Path(name).exists()


# --------------------------------------------------------------------------------------------- model card
def _fence(text: str) -> str:
    """A backtick fence longer than any backtick run inside text, so the block shows it verbatim."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _code_block(text: str, lang: str = "text") -> list[str]:
    fence = _fence(text)
    return [fence + lang, text, fence]


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}" if isinstance(value, (int, float)) else "–"


def _metric_row(*labels: str, m: dict[str, Any]) -> str:
    cells = [*labels, str(m.get("n", "–"))]
    cells += [_pct(m.get(k)) for k in ("exact_match", "relaxed_accuracy", "relaxed_accuracy_strict", "score")]
    return "| " + " | ".join(cells) + " |"


def _metrics_section(evals: dict[str, dict[str, Any]], default_split: str) -> list[str]:
    if not evals:
        return [
            "## Evaluation",
            "",
            "No evaluation was run (`vlm-tune eval` writes eval/<name>/metrics.json).",
            "",
        ]
    lines = [
        "## Evaluation",
        "",
        "Scores in percent. *exact match*: normalised string equality; *relaxed accuracy*: ChartQA's metric "
        "(numbers within 5% of the gold value count as correct), robust to units, separators and lists; "
        "*relaxed (strict)*: the reference pix2struct definition, comparable with published numbers; "
        "*protocol score*: the metric of the evaluation protocol (vlm-tune, lmms-eval, vlmevalkit: prompt, "
        "decoding, post-processing and metric of that harness, see vlm-tune's `vlm_tune/protocols.py`).",
        "",
        "| model | protocol | split | n | exact match | relaxed accuracy | relaxed (strict) | protocol score |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    differs = []
    for name, m in evals.items():
        splits = m.get("by_split") or {}
        only = next(iter(splits)) if len(splits) == 1 else None
        label = str(m.get("split") or only or default_split or "all") if len(splits) <= 1 else "all"
        proto = (m.get("protocol") or {}).get("name") or "vlm-tune"
        lines.append(_metric_row(name, proto, label, m=m))
        if len(splits) > 1:
            lines += [_metric_row(name, proto, split, m=sm) for split, sm in splits.items()]
        if (m.get("protocol") or {}).get("differs_from_training"):
            differs.append(f"`{name}` ({proto})")
    if differs:
        lines += ["", "Prompt differs from the training prompt in: " + ", ".join(differs) + "."]
    notes = [f"`{n}`: {_EVAL_NOTES[n]}" for n in evals if n in _EVAL_NOTES]
    if notes:
        lines += ["", "Rows: " + "; ".join(notes) + "."]
    first_name, first = next(iter(evals.items()))
    by_type = first.get("by_type") or {}
    if by_type:
        lines += [
            "",
            f"Per question type (`{first_name}`):",
            "",
            "| type | n | exact match | relaxed accuracy | relaxed (strict) | protocol score |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for qtype, tm in by_type.items():
            lines.append(_metric_row(qtype, m=tm))
    lines.append("")
    return lines


def _training_section(cfg: dict[str, Any], adapter: dict[str, Any]) -> list[str]:
    run, model, data = cfg.get("run") or {}, cfg.get("model") or {}, cfg.get("data") or {}
    train, lora = cfg.get("train") or {}, cfg.get("lora") or {}
    method = train.get("method") or ("lora" if adapter else "full")
    rows: list[tuple[str, Any]] = [("method", method)]
    if method in ("lora", "qlora"):
        rows += [
            ("LoRA r", lora.get("r", adapter.get("r"))),
            ("LoRA alpha", lora.get("alpha", adapter.get("lora_alpha"))),
            ("LoRA dropout", lora.get("dropout", adapter.get("lora_dropout"))),
            ("LoRA targets", lora.get("targets")),
            ("fully trained modules", lora.get("modules_to_save") or None),
        ]
    steps = train.get("max_steps")
    rows += [
        ("learning rate", train.get("learning_rate")),
        ("schedule", train.get("lr_scheduler")),
        ("warmup steps", train.get("warmup_steps")),
        ("steps", steps),
        ("epochs", None if steps else train.get("epochs")),
        ("batch size (per device)", train.get("batch_size")),
        ("gradient accumulation", train.get("gradient_accumulation_steps")),
        ("weight decay", train.get("weight_decay")),
        ("max length (tokens)", train.get("max_length")),
        ("dtype", model.get("dtype")),
        ("image longest edge", (model.get("image") or {}).get("longest_edge")),
        ("train split", data.get("train_split")),
        ("seed", run.get("seed")),
    ]
    rows = _stage_rows(cfg) + rows
    lines = ["## Training", "", "| setting | value |", "|---|---|"]
    for key, value in rows:
        if value is None or value == []:
            continue
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        cell = str(value).replace("|", "&#124;")
        lines.append(f"| {key} | {cell} |")
    lines += ["", "The full resolved configuration is in `config.yaml`.", ""]
    return lines


def _stage_rows(cfg: dict[str, Any]) -> list[tuple[str, Any]]:
    """A GRPO run's stages (SFT, then GRPO) and its rl settings; nothing for an SFT run."""
    train, rl = cfg.get("train") or {}, cfg.get("rl") or {}
    if train.get("stage") != "grpo":
        return []
    adapter = (cfg.get("model") or {}).get("adapter")
    start = f"SFT adapter `{adapter}` (its LoRA continued)" if adapter else "the base model (a new adapter)"
    rewards = ", ".join(f"{k} x {v}" for k, v in (rl.get("rewards") or {}).items())
    return [
        ("stages", f"1. SFT (supervised, answer tokens only) 2. GRPO (TRL GRPOTrainer) from {start}"),
        ("GRPO rewards (weight)", rewards),
        ("GRPO group size", rl.get("num_generations")),
        ("GRPO rows per step", rl.get("prompts_per_step")),
        ("GRPO max completion tokens", rl.get("max_completion_length")),
        ("GRPO temperature", rl.get("temperature")),
        ("GRPO KL beta", rl.get("beta")),
        ("GRPO learning rate", rl.get("learning_rate")),
        ("GRPO steps", rl.get("steps")),
        ("SFT settings below", "those of the SFT stage that built the starting adapter"),
    ]


def _software_section(evals: dict[str, dict[str, Any]]) -> list[str]:
    """The library versions and image backend the evaluations recorded (metrics.json), first eval first."""
    recorded = {name: m for name, m in evals.items() if isinstance(m.get("versions"), dict)}
    lines = ["## Software", ""]
    if not recorded:
        return lines + [
            "The evaluations recorded no library versions (metrics.json from an older vlm-tune).",
            "",
        ]
    name, first = next(iter(recorded.items()))
    versions = first["versions"]
    lines += [f"As recorded by the `{name}` evaluation (`eval/{name}/metrics.json`):", ""]
    lines += ["| software | version |", "|---|---|"]
    for lib, version in versions.items():
        if lib == "torch" and version:
            cuda = first.get("torch_cuda")
            version = f"{version} ({'CUDA ' + str(cuda) + ' build' if cuda else 'CPU build'})"
        lines.append(f"| {lib} | {version or 'not installed'} |")
    backend = first.get("image_backend")
    if backend:
        lines.append(f"| image processors | {backend} |")
    for other, m in recorded.items():
        changed = [f"{lib} {v}" for lib, v in m["versions"].items() if versions.get(lib) != v]
        if m.get("image_backend") != backend:
            changed.append(f"image processors {m.get('image_backend')}")
        if changed:
            lines += ["", f"`{other}` ran with other software: {', '.join(changed)}."]
    if backend == "pil":
        lines += [
            "",
            "Images went through transformers' PIL image processors (torchvision was not installed); where "
            "torchvision is installed transformers uses its torchvision processors, whose pixels can differ "
            "slightly.",
        ]
    lines.append("")
    return lines


def build_model_card(run_dir: str | Path, repo_id: str | None = None, merged: bool = False) -> str:
    """README.md for a finished run: YAML metadata, what it is, the prompt contract, metrics, training
    settings and a loading snippet that needs only transformers + peft. `repo_id` goes into the snippet
    (default: a placeholder); `merged` documents the merged/ folder. Deterministic: same run, same card."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    cfg, adapter, prompt = run["cfg"], run["adapter"], run["prompt"]
    model_cfg, data, hub = cfg.get("model") or {}, cfg.get("data") or {}, cfg.get("hub") or {}
    is_adapter = bool(adapter)
    base = adapter.get("base_model_name_or_path") or model_cfg.get("name_or_path") or ""
    hub_base = next((b for b in (base, model_cfg.get("name_or_path")) if _is_hub_id(b)), None)
    source = data.get("source")

    meta: dict[str, Any] = {}
    if hub_base:
        meta["base_model"] = hub_base
    meta["library_name"] = "peft" if is_adapter else "transformers"
    if _is_hub_id(source):
        meta["datasets"] = [source]
    license_ = hub.get("license") or (cfg.get("run") or {}).get("license")
    if license_:
        meta["license"] = license_
    meta["tags"] = [t for t in TAGS if is_adapter or t != "lora"]
    meta["pipeline_tag"] = "image-text-to-text"

    name = (cfg.get("run") or {}).get("name") or run_dir.name
    method = (cfg.get("train") or {}).get("method") or ("lora" if is_adapter else "full")
    what = {"lora": "A LoRA adapter for", "qlora": "A QLoRA adapter (trained on a 4-bit base) for"}.get(
        method, "A full fine-tune of"
    )
    base_text = (
        f"[`{hub_base}`](https://huggingface.co/{hub_base})" if hub_base else f"`{base}` (a local model)"
    )
    source_text = (
        f"[`{source}`](https://huggingface.co/datasets/{source})" if _is_hub_id(source) else f"`{source}`"
    )
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", ""]
    lines += [
        f"# {name}",
        "",
        f"{what} {base_text} that answers questions about chart images with a short answer (a word or "
        f"a number). Trained with vlm-tune on {source_text}; only the answer tokens "
        "were supervised"
        + (
            ", then reinforced by GRPO with the evaluation metric as the reward"
            if (cfg.get("train") or {}).get("stage") == "grpo"
            else ""
        )
        + ". It loads with plain transformers"
        + (" + peft" if is_adapter else "")
        + " (below).",
        "",
        "Files: "
        + (
            "`adapter_model.safetensors` + `adapter_config.json` (the adapter), "
            if is_adapter
            else "`config.json` + the `*.safetensors` weights (the model), "
        )
        + "the processor with its chat template, `prompt.json` (the prompt contract), `config.yaml` "
        "(the training configuration) and `eval/<name>/` (metrics and every prediction)"
        + (
            ", `merged/` (the base model with the adapter merged in: plain transformers, no peft)."
            if merged
            else "."
        ),
        "",
        "## Prompt contract",
        "",
        "Ask exactly as in training (saved as `prompt.json`): the user turn holds the image(s) first, then "
        "the user template with `{question}` replaced by the question.",
        "",
    ]
    system = prompt.get("system")
    lines += ["System prompt:", ""] + (_code_block(system) if system else ["*(none: no system turn)*"])
    lines += ["", "User template:", ""] + _code_block(str(prompt["user_template"])) + [""]
    answer_format = prompt.get("answer_format", "plain")
    if answer_format == "tagged":
        lines += [
            "Answer format: tagged. The model may reason first; its answer is the text inside the last "
            "`<answer>...</answer>` of the completion (none: an empty answer, scored 0). The evaluation below, "
            "the GRPO reward and the snippet all take the answer this way.",
            "",
        ]
    evals = run_evals(run_dir)
    lines += _metrics_section(evals, str(data.get("eval_split") or ""))
    lines += _training_section(cfg, adapter)
    lines += _software_section(evals)
    needs = "`transformers`, `peft`, `torch`" if is_adapter else "`transformers`, `torch`"
    if is_adapter and method == "qlora":
        needs += ", `bitsandbytes`"
    lines += ["## Use it", "", f"Needs {needs} and `pillow` (no vlm-tune):", ""]
    fam = _run_family(run_dir / "final")
    evaluated = (evals.get("final") or {}).get("dtype")
    snippet = model_card_snippet(repo_id or "ORG/NAME", base, cfg, is_adapter, fam, evaluated, answer_format)
    lines += _code_block("\n".join(snippet), "python")
    if merged:
        lines += [
            "",
            "The merged model needs no peft: `AutoModelForImageTextToText.from_pretrained(path, "
            'subfolder="merged")` and `AutoProcessor.from_pretrained(path, subfolder="merged")`.',
        ]
    lines.append("")
    return "\n".join(lines)
