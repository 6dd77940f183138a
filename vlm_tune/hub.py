"""Push a run's adapter to a model hub (or a local directory) with a generated model card.

What is pushed: everything in RUN_DIR/final (adapter, processor, chat template, prompt.json, config.yaml),
eval/<name>/metrics.json and predictions.jsonl, and README.md (the model card). With `merged`, RUN_DIR/merged
goes under `merged/`. The token comes from the argument, HF_TOKEN or the login store, and is never written.
A hub commit is atomic on the server: a push that fails part-way leaves the repo as it was, and running the
same push again completes it. Files already on the hub with the same content are skipped, so an unchanged
re-push makes no commit.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from vlm_tune.errors import UserError

TAGS = ["vlm-tune", "lora", "chart-qa", "smolvlm", "image-text-to-text"]


def _load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    final = run_dir / "final"
    if not (final / "prompt.json").is_file():
        raise UserError(
            f"{final}: no finished run here (prompt.json missing); train first or pass the run directory"
        )
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    adapter = (
        json.loads((final / "adapter_config.json").read_text())
        if (final / "adapter_config.json").is_file()
        else {}
    )
    prompt = json.loads((final / "prompt.json").read_text())
    return cfg, adapter, prompt


def _evals(run_dir: Path) -> dict[str, dict[str, Any]]:
    found = {
        p.parent.name: json.loads(p.read_text()) for p in sorted((run_dir / "eval").glob("*/metrics.json"))
    }
    order = sorted(found, key=lambda n: (n != "final", n))
    return {n: found[n] for n in order}


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def build_model_card(run_dir: str | Path) -> str:
    """README.md: YAML metadata, what it is, the prompt contract, metrics, hyper-parameters, a loading snippet."""
    run_dir = Path(run_dir)
    cfg, adapter, prompt = _load_run(run_dir)
    base = adapter.get("base_model_name_or_path") or cfg.get("model", {}).get("name_or_path", "")
    data = cfg.get("data", {})
    meta: dict[str, Any] = {"library_name": "peft", "pipeline_tag": "image-text-to-text", "tags": TAGS}
    if _is_hub_id(base):
        meta["base_model"] = base
    if _is_hub_id(str(data.get("source", ""))):
        meta["datasets"] = [data["source"]]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]
    name = cfg.get("run", {}).get("name", run_dir.name)
    lines += [
        f"# {name}",
        "",
        f"A LoRA adapter for `{base}` fine-tuned for chart question answering with "
        f"[vlm-tune](https://github.com/) on `{data.get('source', '?')}`. Only answer tokens were supervised.",
        "",
    ]
    lines += [
        "## Prompt contract",
        "",
        "Use exactly this prompt at inference (it is saved as `prompt.json`):",
        "",
        "```",
        f"system: {prompt.get('system')!r}",
        f"user_template: {prompt.get('user_template')!r}",
        "```",
        "",
    ]
    evals = _evals(run_dir)
    if evals:
        lines += [
            "## Evaluation",
            "",
            "| eval | split | n | exact match | relaxed accuracy | relaxed (strict) |",
            "|---|---|---|---|---|---|",
        ]
        for ename, m in evals.items():
            lines.append(
                f"| {ename} | all | {m['n']} | {m['exact_match']:.3f} | {m['relaxed_accuracy']:.3f} | "
                f"{m.get('relaxed_accuracy_strict', float('nan')):.3f} |"
            )
            for split, sm in m.get("by_split", {}).items():
                lines.append(
                    f"| {ename} | {split} | {sm['n']} | {sm['exact_match']:.3f} | "
                    f"{sm['relaxed_accuracy']:.3f} | {sm.get('relaxed_accuracy_strict', float('nan')):.3f} |"
                )
        lines.append("")
    t, lo = cfg.get("train", {}), cfg.get("lora", {})
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    for key, value in [
        ("method", t.get("method")),
        ("lora r / alpha / dropout", f"{lo.get('r')} / {lo.get('alpha')} / {lo.get('dropout')}"),
        ("lora targets", lo.get("targets")),
        ("learning rate", t.get("learning_rate")),
        ("max steps", t.get("max_steps")),
        ("epochs", t.get("epochs")),
        ("batch size", t.get("batch_size")),
        ("gradient accumulation", t.get("gradient_accumulation_steps")),
        ("seed", cfg.get("run", {}).get("seed")),
    ]:
        lines.append(f"| {key} | {value} |")
    lines += [
        "",
        "## Use it (transformers + peft only)",
        "",
        "```python",
        "import json",
        "import torch",
        "from PIL import Image",
        "from huggingface_hub import snapshot_download",
        "from peft import PeftModel",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        'adapter = snapshot_download("REPO_ID")  # or a local directory',
        'prompt = json.load(open(f"{adapter}/prompt.json"))',
        "processor = AutoProcessor.from_pretrained(adapter)",
        f'model = AutoModelForImageTextToText.from_pretrained("{base}")',
        "model = PeftModel.from_pretrained(model, adapter).eval()",
        'question = "How many bars are there?"',
        'messages = [{"role": "system", "content": [{"type": "text", "text": prompt["system"]}]}] if prompt["system"] else []',
        'messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", '
        '"text": prompt["user_template"].format(question=question)}]})',
        "text = processor.apply_chat_template(messages, add_generation_prompt=True)",
        'inputs = processor(text=[text], images=[[Image.open("chart.png").convert("RGB")]], return_tensors="pt")',
        "out = model.generate(**inputs, max_new_tokens=16, do_sample=False)",
        "print(processor.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True).strip())",
        "```",
        "",
    ]
    return "\n".join(lines)


def collect_files(run_dir: str | Path, merged: bool = False) -> dict[str, Path]:
    """Repo path → local file, for everything a push uploads (README.md excluded: it is generated)."""
    run_dir = Path(run_dir)
    _load_run(run_dir)
    files = {
        p.relative_to(run_dir / "final").as_posix(): p
        for p in sorted((run_dir / "final").rglob("*"))
        if p.is_file()
    }
    for p in sorted((run_dir / "eval").glob("*/*")):
        if p.name in ("metrics.json", "predictions.jsonl"):
            files[f"eval/{p.parent.name}/{p.name}"] = p
    if merged:
        merged_dir = run_dir / "merged"
        if not (merged_dir / "config.json").is_file():
            raise UserError(
                f"{merged_dir}: no merged model; run `vlm-tune merge {run_dir / 'final'} {merged_dir}` first"
            )
        files.update(
            {
                f"merged/{p.relative_to(merged_dir).as_posix()}": p
                for p in sorted(merged_dir.rglob("*"))
                if p.is_file()
            }
        )
    return files


def _local_target(repo_id: str) -> Path | None:
    if repo_id.startswith("file://"):
        return Path(repo_id[len("file://") :])
    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1 or Path(repo_id).exists():
        return Path(repo_id).expanduser()
    return None


def _push_local(files: dict[str, Path], card: str, target: Path) -> str:
    target.mkdir(parents=True, exist_ok=True)
    for rel, src in files.items():
        dst = target / rel
        if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
        os.close(fd)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    readme = target / "README.md"
    if not readme.is_file() or readme.read_text() != card:
        readme.write_text(card)
    return str(target)


def push(
    run_dir: str | Path,
    repo_id: str,
    private: bool = True,
    revision: str | None = None,
    merged: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a run to ORG/NAME on the hub (HF_ENDPOINT honoured) or copy it to a local directory."""
    run_dir = Path(run_dir)
    files = collect_files(run_dir, merged)
    target = _local_target(repo_id)
    card = build_model_card(run_dir).replace("REPO_ID", str(target) if target is not None else repo_id)
    if target is not None:
        return _push_local(files, card, target)

    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if constants.HF_HUB_OFFLINE:
        raise UserError(
            "HF_HUB_OFFLINE=1 is set: unset it to push, or push to a local directory (--repo-id ./dir)"
        )
    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise UserError("no hub token: set HF_TOKEN or run `hf auth login`")
    api = HfApi(token=token)
    operations = [
        CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files.items()
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.create_commit(
            repo_id,
            operations=operations,
            revision=revision,
            commit_message=commit_message or f"vlm-tune: {run_dir.name}",
        )
    except OfflineModeIsEnabled:
        raise UserError("HF_HUB_OFFLINE=1 is set: unset it to push, or push to a local directory") from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        hint = {401: "the token is invalid", 403: "the token cannot write to this repo"}.get(
            status, "the hub refused"
        )
        raise UserError(
            f"push to {repo_id} failed ({hint}: {str(err).splitlines()[0]}). Nothing partial was "
            "committed; fix the cause and run the same push again."
        ) from None
    except (OSError, ValueError) as err:
        raise UserError(
            f"push to {repo_id} failed: {type(err).__name__}: {err}. Run the same push again."
        ) from None
    return str(url) + (f"/tree/{revision}" if revision else "")
