"""Publishing a run: model card, file set, local-directory target, and hub pushes through a local stand-in.

No hub is reachable here: tests/hub_server.py stands in for huggingface.co's upload/download HTTP API, and the
unmodified huggingface_hub client talks to it over HTTP. huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and
HF_HUB_DISABLE_XET when it is imported, so every hub push or download runs in a subprocess with its own
environment (HF_HUB_OFFLINE, which the test session sets, removed). The run directory is a small fake with
the layout training writes; one opt-in test (VLM_TUNE_REAL_HUB_TOKEN) pushes to the real hub.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlm_tune.card import TAGS, build_model_card
from vlm_tune.errors import UserError
from vlm_tune.hub import collect_files, push

from .hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_testtoken123"
BASE = "HuggingFaceTB/SmolVLM-256M-Instruct"
DATASET = "HuggingFaceM4/ChartQA"
SYSTEM = "You read charts. Never wrap an answer in ``` fences."
TEMPLATE = "{question}\nAnswer with a single word or number."
REPO = "me/chart-lora"

CONFIG = {
    "run": {"name": "chartqa-lora", "output_dir": "runs/chartqa-lora", "seed": 7},
    "model": {
        "name_or_path": BASE,
        "revision": None,
        "dtype": "bfloat16",
        "image": {"longest_edge": 512, "tile_size": None, "do_image_splitting": None},
        "cache_dir": ".cache/vlm-tune",
    },
    "data": {"source": DATASET, "train_split": "train", "eval_split": "test", "columns": "chartqa"},
    "prompt": {"system": SYSTEM, "user_template": TEMPLATE},
    "lora": {
        "r": 16,
        "alpha": 32,
        "dropout": 0.05,
        "targets": ["decoder", "projector"],
        "modules_to_save": [],
    },
    "train": {
        "method": "lora",
        "learning_rate": 0.0002,
        "batch_size": 8,
        "gradient_accumulation_steps": 2,
        "max_steps": 1200,
        "epochs": 1.0,
        "warmup_steps": 50,
        "lr_scheduler": "cosine",
        "weight_decay": 0.0,
        "max_length": 2048,
    },
    "eval": {"batch_size": 32, "max_new_tokens": 16, "baselines": ["untrained"]},
    "hub": {
        "repo_id": None,
        "private": True,
        "revision": None,
        "push_on_end": False,
        "license": "apache-2.0",
    },
    "logging": {"report_to": ["none"], "wandb_project": "vlm-tune", "progress": True},
}


def _scores(n: int, em: float, ra: float, strict: float) -> dict:
    return {"n": n, "exact_match": em, "relaxed_accuracy": ra, "relaxed_accuracy_strict": strict}


METRICS = {
    "final": {
        **_scores(2500, 0.6124, 0.7012, 0.6876),
        "by_split": {
            "human": _scores(1250, 0.4408, 0.5232, 0.5104),
            "augmented": _scores(1250, 0.784, 0.8792, 0.8648),
        },
        "by_type": {"numeric": _scores(1800, 0.55, 0.67, 0.66), "text": _scores(700, 0.77, 0.78, 0.76)},
    },
    "untrained": {
        **_scores(2500, 0.2136, 0.2812, 0.2704),
        "by_split": {
            "human": _scores(1250, 0.1504, 0.2, 0.192),
            "augmented": _scores(1250, 0.2768, 0.3624, 0.3488),
        },
        "by_type": {},
    },
}


def make_run(root: Path, config: dict | None = None, metrics: dict | None = None) -> Path:
    """A finished run directory with the layout training writes (small files, known bytes)."""
    config = config or CONFIG
    metrics = METRICS if metrics is None else metrics
    rng = random.Random(0)
    run = root / "run"
    final = run / "final"
    final.mkdir(parents=True)
    cfg_text = yaml.safe_dump(config, sort_keys=False)
    (run / "config.yaml").write_text(cfg_text)
    (final / "config.yaml").write_text(cfg_text)
    (final / "adapter_config.json").write_text(
        json.dumps(
            {
                "base_model_name_or_path": config["model"]["name_or_path"],
                "peft_type": "LORA",
                "task_type": None,
                "r": config["lora"]["r"],
                "lora_alpha": config["lora"]["alpha"],
                "lora_dropout": config["lora"]["dropout"],
                "target_modules": r"(.*\.)?(model\.text_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj)",
                "modules_to_save": None,
            },
            indent=2,
        )
    )
    (final / "adapter_model.safetensors").write_bytes(rng.randbytes(300_000))
    (final / "tokenizer.json").write_text(
        json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}})
    )
    (final / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 8192, "padding_side": "left"})
    )
    (final / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<end_of_utterance>"}))
    (final / "processor_config.json").write_text(
        json.dumps({"image_seq_len": 64, "processor_class": "Idefics3Processor"})
    )
    (final / "preprocessor_config.json").write_text(json.dumps({"size": {"longest_edge": 512}}))
    (final / "chat_template.jinja").write_text(
        "<|im_start|>{% for m in messages %}{{ m['role'] }}{% endfor %}"
    )
    prompt = {"system": config["prompt"]["system"], "user_template": config["prompt"]["user_template"]}
    (final / "prompt.json").write_text(json.dumps(prompt, indent=2) + "\n")
    for name, m in metrics.items():
        d = run / "eval" / name
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(m, indent=2))
        rows = [
            {"id": f"test-{i:06d}", "question": "Which bar is highest?", "gold": ["A"], "prediction": "A"}
            for i in range(3)
        ]
        (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # things a run directory also holds that must not be published
    (run / "checkpoint-100").mkdir()
    (run / "checkpoint-100" / "optimizer.pt").write_bytes(b"\0" * 100)
    (run / "train_log.json").write_text("[]")
    (run / "report.html").write_text("<html></html>")
    if (run / "eval" / "final").is_dir():
        (run / "eval" / "final" / "scratch.txt").write_text("not published")
    return run


EXPECTED = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "chat_template.jinja",
    "config.yaml",
    "preprocessor_config.json",
    "processor_config.json",
    "prompt.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "eval/final/metrics.json",
    "eval/final/predictions.jsonl",
    "eval/untrained/metrics.json",
    "eval/untrained/predictions.jsonl",
}


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path)


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def python_block(card: str) -> str:
    m = re.search(r"^(`{3,})python\n(.*?)\n\1$", card, re.S | re.M)
    assert m, "the card has a python code block"
    return m.group(2)


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


# --------------------------------------------------------------------------------------------- model card
def test_model_card_metadata_prompt_metrics_and_snippet(run_dir):
    card = build_model_card(run_dir, REPO)
    meta = front_matter(card)
    assert meta["base_model"] == BASE
    assert meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert meta["datasets"] == [DATASET]
    assert meta["license"] == "apache-2.0"
    assert meta["tags"] == TAGS

    # the prompt contract, verbatim in code blocks (the system prompt holds a ``` run: a longer fence)
    assert "```text\n" + TEMPLATE + "\n```" in card
    assert "````text\n" + SYSTEM + "\n````" in card

    # every number of every metrics.json, overall and per split; final first
    for name, m in METRICS.items():
        row = f"| {name} | vlm-tune | all | {m['n']} | {pct(m['exact_match'])} | {pct(m['relaxed_accuracy'])} | {pct(m['relaxed_accuracy_strict'])} |"
        assert row in card
        for split, s in m["by_split"].items():
            assert (
                f"| {name} | vlm-tune | {split} | {s['n']} | {pct(s['exact_match'])} | {pct(s['relaxed_accuracy'])} |"
                in card
            )
    assert card.index("| final | vlm-tune | all |") < card.index("| untrained | vlm-tune | all |")
    assert f"| numeric | 1800 | {pct(0.55)} |" in card

    for row in ["| method | lora |", "| LoRA r | 16 |", "| LoRA alpha | 32 |", "| LoRA dropout | 0.05 |"]:
        assert row in card
    for row in ["| LoRA targets | decoder, projector |", "| learning rate | 0.0002 |", "| steps | 1200 |"]:
        assert row in card
    assert "| batch size (per device) | 8 |" in card and "| seed | 7 |" in card

    code = python_block(card)
    tree = ast.parse(code)  # valid Python
    imported = {
        (n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    assert imported <= {"json", "pathlib", "torch", "huggingface_hub", "PIL", "peft", "transformers"}
    assert "vlm_tune" not in code
    for needle in [
        "PeftModel.from_pretrained",
        "AutoProcessor.from_pretrained",
        "AutoModelForImageTextToText",
    ]:
        assert needle in code
    assert "apply_chat_template" in code and "do_sample=False" in code and 'Path(path, "prompt.json")' in code
    assert f'repo = "{REPO}"' in code and f'from_pretrained("{BASE}"' in code
    assert build_model_card(run_dir, REPO) == card, "deterministic: an unchanged run gives the same card"


def test_model_card_local_base_and_dataset_stay_out_of_metadata(tmp_path):
    cfg = json.loads(json.dumps(CONFIG))
    cfg["model"]["name_or_path"] = str(tmp_path / "my-base")
    cfg["data"]["source"] = "synthetic"
    cfg["prompt"]["system"] = None
    del cfg["hub"]["license"]
    run = make_run(tmp_path, cfg, metrics={})
    card = build_model_card(run)
    meta = front_matter(card)
    assert "base_model" not in meta and "datasets" not in meta and "license" not in meta
    assert meta["library_name"] == "peft"
    assert "no system turn" in card and "No evaluation was run" in card
    assert 'repo = "ORG/NAME"' in python_block(card)


def test_model_card_of_a_full_fine_tune_needs_no_peft(tmp_path):
    cfg = json.loads(json.dumps(CONFIG))
    cfg["train"]["method"] = "full"
    run = make_run(tmp_path, cfg)
    (run / "final" / "adapter_config.json").unlink()
    (run / "final" / "adapter_model.safetensors").unlink()
    (run / "final" / "config.json").write_text("{}")
    (run / "final" / "model.safetensors").write_bytes(b"weights")
    card = build_model_card(run, REPO)
    meta = front_matter(card)
    assert (
        meta["library_name"] == "transformers" and meta["base_model"] == BASE and "lora" not in meta["tags"]
    )
    code = python_block(card)
    assert "peft" not in code and "AutoModelForImageTextToText.from_pretrained(path" in code
    assert {"config.json", "model.safetensors"} <= set(collect_files(run))


# --------------------------------------------------------------------------------------------- file set
def test_collect_files_is_the_published_set(run_dir):
    files = collect_files(run_dir)
    assert set(files) == EXPECTED
    assert files["adapter_model.safetensors"] == run_dir / "final" / "adapter_model.safetensors"
    assert files["eval/final/metrics.json"] == run_dir / "eval" / "final" / "metrics.json"
    assert files["README.md"].read_text() == build_model_card(run_dir)

    with pytest.raises(UserError, match="vlm-tune merge"):
        collect_files(run_dir, merged=True)
    merged = run_dir / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / "model.safetensors").write_bytes(b"weights")
    (merged / "tokenizer.json").write_text("{}")
    files = collect_files(run_dir, merged=True)
    assert set(files) == EXPECTED | {
        "merged/config.json",
        "merged/model.safetensors",
        "merged/tokenizer.json",
    }
    assert 'subfolder="merged"' in files["README.md"].read_text()


def test_missing_final_is_a_user_error(tmp_path, run_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="(?i)train first"):
        push(tmp_path / "empty", str(tmp_path / "out"))
    with pytest.raises(UserError, match="(?i)train first"):
        collect_files(tmp_path / "empty")
    with pytest.raises(UserError, match="pass the run directory above it"):
        build_model_card(run_dir / "final")
    (run_dir / "final" / "prompt.json").unlink()
    with pytest.raises(UserError, match="prompt.json"):
        push(run_dir, REPO)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- local target
def test_push_to_local_directory_is_exact_and_idempotent(run_dir, tmp_path):
    target = tmp_path / "published"
    assert push(run_dir, str(target)) == str(target)
    on_disk = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    files = collect_files(run_dir, repo_id=str(target))
    assert on_disk == set(files) == EXPECTED
    for rel, src in files.items():
        assert (target / rel).read_bytes() == src.read_bytes(), rel
    assert f'repo = "{target}"' in (target / "README.md").read_text()

    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in target.rglob("*")}
    assert push(run_dir, f"file://{target}") == str(target)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in target.rglob("*")} == stamps, (
        "an unchanged re-push rewrites nothing"
    )

    metrics = run_dir / "eval" / "final" / "metrics.json"
    metrics.write_text(json.dumps({**METRICS["final"], "exact_match": 0.9}))
    push(run_dir, str(target))
    changed = {
        p.relative_to(target).as_posix()
        for p in stamps
        if p.is_file() and (p.stat().st_ino, p.stat().st_mtime_ns) != stamps[p]
    }
    assert changed == {"eval/final/metrics.json", "README.md"}
    assert "| final | vlm-tune | all | 2500 | 90.0 |" in (target / "README.md").read_text()
    assert not [p for p in target.rglob(".*")], "no temporary files left behind"


# --------------------------------------------------------------------------------------------- hub target
# (marked slow: each runs pushes and downloads in subprocesses, about 1 s apiece)
def hub_env(endpoint: str, home: Path, **extra: str) -> dict[str, str]:
    drop = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_ENDPOINT", "VLM_TUNE_REAL_HUB_TOKEN")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_TOKEN=TOKEN,
        HF_HOME=str(home),
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


def run_py(code: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    if check:
        assert r.returncode == 0, r.stderr
    return r


def cli_push(run: Path, repo: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vlm_tune.cli", "push", str(run), "--repo-id", repo, *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def py_push(
    run: Path, repo: str, env: dict[str, str], ok: bool = True, **kwargs
) -> subprocess.CompletedProcess:
    """push() in a subprocess; a UserError exits 2 with `error: ...` on stderr, as the CLI does."""
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    code = f"""
import sys
from vlm_tune.errors import UserError
from vlm_tune.hub import push
try:
    print(push({str(run)!r}, {repo!r}{args}))
except UserError as err:
    print(f"error: {{err}}", file=sys.stderr)
    sys.exit(2)
"""
    r = run_py(code, env, check=False)
    if ok:
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    return r


def download(repo: str, dest: Path, env: dict[str, str], revision: str = "main") -> None:
    run_py(
        "from huggingface_hub import snapshot_download; "
        f"snapshot_download({repo!r}, revision={revision!r}, local_dir={str(dest)!r})",
        env,
    )


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(folder).parts
    }


@pytest.mark.slow
def test_push_round_trip_token_and_no_leak(run_dir, hub, tmp_path):
    env = hub_env(hub.endpoint, tmp_path / "hf")
    out = py_push(run_dir, REPO, env)
    commit = hub.state.repo(REPO).branches["main"][-1]
    assert out.stdout.strip() == f"{hub.endpoint}/{REPO}/commit/{commit.oid}"
    assert hub.state.commit_count(REPO) == 1
    files = collect_files(run_dir, repo_id=REPO)
    assert set(hub.state.files(REPO)) == set(files) | {".gitattributes"}

    # every request carried the token, as a bearer header and nowhere else
    assert hub.state.requests
    for r in hub.state.requests:
        headers = {k.lower(): v for k, v in r["headers"].items()}
        assert headers.get("authorization") == f"Bearer {TOKEN}", r["path"]
        assert TOKEN.encode() not in r["body"] and TOKEN not in r["path"]

    dest = tmp_path / "downloaded"
    download(REPO, dest, env)
    got = tree(dest)
    assert set(got) == set(files) | {".gitattributes"}
    for rel, src in files.items():
        assert got[rel] == src.read_bytes(), rel
    meta = front_matter(got["README.md"].decode())
    assert meta["base_model"] == BASE and meta["library_name"] == "peft"

    texts = [out.stdout, out.stderr, *(d.decode(errors="ignore") for d in got.values())]
    texts += [p.read_text(errors="ignore") for p in (tmp_path / "hf").rglob("*") if p.is_file()]
    texts += [
        p.read_text(errors="ignore") for p in run_dir.rglob("*") if p.is_file() and p.suffix != ".safetensors"
    ]
    assert not [t for t in texts if TOKEN in t], "the token is in no pushed file, output, cache or run file"


@pytest.mark.slow
def test_unchanged_repush_makes_no_commit(run_dir, hub, tmp_path):
    env = hub_env(hub.endpoint, tmp_path / "hf")
    first = py_push(run_dir, REPO, env)
    assert hub.state.commit_count(REPO) == 1 and len(hub.state.requests_to("POST", "/commit/")) == 1
    second = py_push(run_dir, REPO, env)
    assert hub.state.commit_count(REPO) == 1, "an unchanged re-push creates no commit"
    assert len(hub.state.requests_to("POST", "/commit/")) == 1, "and sends no commit request"
    assert second.stdout == first.stdout, "it reports the current head"

    (run_dir / "eval" / "final" / "metrics.json").write_text(
        json.dumps({**METRICS["final"], "exact_match": 0.9})
    )
    py_push(run_dir, REPO, env)
    assert hub.state.commit_count(REPO) == 2
    body = hub.state.requests_to("POST", "/commit/")[-1]["body"].decode()
    sent = {json.loads(line)["value"]["path"] for line in body.splitlines() if '"key": "file"' in line}
    assert sent == {"eval/final/metrics.json", "README.md"}, "only the changed files travel"


@pytest.mark.slow
def test_failed_commit_leaves_nothing_and_retry_completes(run_dir, hub, tmp_path):
    env = hub_env(hub.endpoint, tmp_path / "hf")
    hub.state.fail_next_commit()
    first = cli_push(run_dir, REPO, env)  # through the CLI: exit 2, a message, no traceback
    assert first.returncode == 2, first.stderr
    assert "500" in first.stderr and "run the same push again" in first.stderr
    assert "Traceback" not in first.stderr
    assert hub.state.commit_count(REPO) == 0 and set(hub.state.files(REPO)) == {".gitattributes"}

    py_push(run_dir, REPO, env)
    assert hub.state.commit_count(REPO) == 1
    files = collect_files(run_dir, repo_id=REPO)
    stored = hub.state.files(REPO)
    assert set(stored) == set(files) | {".gitattributes"}
    assert all(stored[rel] == path.read_bytes() for rel, path in files.items())


@pytest.mark.slow
def test_push_to_a_branch(run_dir, hub, tmp_path):
    env = hub_env(hub.endpoint, tmp_path / "hf")
    py_push(run_dir, REPO, env, revision="v1", private=True)
    assert hub.state.commit_count(REPO, "v1") == 1 and hub.state.commit_count(REPO, "main") == 0
    assert hub.state.repo(REPO).private
    assert "adapter_model.safetensors" in hub.state.files(REPO, "v1")
    assert "adapter_model.safetensors" not in hub.state.files(REPO, "main")
    dest = tmp_path / "v1"
    download(REPO, dest, env, revision="v1")
    assert tree(dest)["prompt.json"] == (run_dir / "final" / "prompt.json").read_bytes()

    py_push(run_dir, REPO, env, revision="v1")  # the branch exists now and nothing changed
    assert hub.state.commit_count(REPO, "v1") == 1 and len(hub.state.requests_to("POST", "/branch/")) == 2


@pytest.mark.slow
def test_hub_errors_are_user_errors_with_the_fix(run_dir, hub, tmp_path):
    hub.state.valid_tokens = {TOKEN, "hf_readonly"}
    hub.state.read_only_tokens = {"hf_readonly"}
    env = hub_env(hub.endpoint, tmp_path / "hf")
    bad_token = py_push(run_dir, "me/a", env, ok=False, token="hf_wrong").stderr
    assert "401" in bad_token and "HF_TOKEN" in bad_token and "hf_wrong" not in bad_token
    read_only = py_push(run_dir, "me/b", env, ok=False, token="hf_readonly").stderr
    assert "403" in read_only and "write access" in read_only and "hf_readonly" not in read_only
    assert not hub.state.repos, "nothing was created"

    n = len(hub.state.requests)
    invalid = py_push(run_dir, "me/b/c", env, ok=False).stderr
    assert "ORG/NAME" in invalid and "./me/b/c" in invalid
    assert "not a valid hub repo id" in py_push(run_dir, "me/na me", env, ok=False).stderr
    offline = py_push(run_dir, REPO, {**env, "HF_HUB_OFFLINE": "1"}, ok=False).stderr
    assert "HF_HUB_OFFLINE" in offline and "--repo-id ./DIR" in offline
    no_token = {k: v for k, v in hub_env(hub.endpoint, tmp_path / "empty-home").items() if k != "HF_TOKEN"}
    assert "hf auth login" in py_push(run_dir, REPO, no_token, ok=False).stderr
    assert len(hub.state.requests) == n, "none of these made a request"

    unreachable = py_push(run_dir, REPO, hub_env("http://127.0.0.1:9", tmp_path / "hf"), ok=False).stderr
    assert "cannot reach the hub" in unreachable and "run the same push again" in unreachable


@pytest.mark.slow
def test_token_in_a_published_file_is_refused(run_dir, hub, tmp_path):
    cfg = yaml.safe_load((run_dir / "final" / "config.yaml").read_text())
    cfg["logging"]["wandb_project"] = TOKEN  # a token pasted where it does not belong
    (run_dir / "final" / "config.yaml").write_text(yaml.safe_dump(cfg))
    err = py_push(run_dir, REPO, hub_env(hub.endpoint, tmp_path / "hf"), ok=False).stderr
    assert "contains your hub token" in err and "config.yaml" in err and TOKEN not in err
    assert not hub.state.requests


# --------------------------------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_card_snippet_answers_like_vlm_tune_on_a_trained_run(lora_run, hub, tmp_path):
    """The card's transformers + peft snippet, run as written, gives vlm-tune's own answer."""
    from PIL import Image

    from vlm_tune.inference import load_for_inference, predict
    from vlm_tune.metrics import clean_generation

    env = hub_env(hub.endpoint, tmp_path / "hf")
    py_push(lora_run, REPO, env)
    dest = tmp_path / "downloaded"
    download(REPO, dest, env)
    assert (dest / "adapter_model.safetensors").read_bytes() == (
        lora_run / "final" / "adapter_model.safetensors"
    ).read_bytes()

    image = tmp_path / "chart.png"
    Image.new("RGB", (64, 64), (0, 160, 40)).save(image)
    question = "How many bars are there?"
    snippet = python_block((dest / "README.md").read_text())
    assert f'repo = "{REPO}"' in snippet
    snippet = snippet.replace(f'repo = "{REPO}"', f"repo = {str(dest)!r}")  # the copy we just downloaded
    snippet = snippet.rsplit("\nprint(", 1)[0]
    # a 2-step tiny model emits image tokens; keep them so both decodes can be compared token for token
    assert "skip_special_tokens=True" in snippet
    snippet = snippet.replace("skip_special_tokens=True", "skip_special_tokens=False")
    snippet += f"\nprint(repr(answer([Image.open({str(image)!r}).convert('RGB')], {question!r})))\n"
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    r = subprocess.run(
        [sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    from_snippet = ast.literal_eval(r.stdout.strip().splitlines()[-1])

    model, processor, prompt = load_for_inference(lora_run / "final")
    expected = predict(
        model, processor, prompt, [{"images": [Image.open(image).convert("RGB")], "question": question}]
    )
    assert clean_generation(from_snippet) == expected[0]


@pytest.mark.slow
def test_push_on_end_of_training_and_merged(cache_dir, tmp_path):
    from vlm_tune.inference import merge
    from vlm_tune.train import train

    from .conftest import tiny_cfg

    target = tmp_path / "published"
    overrides = ["train.max_steps=2", "eval.baselines=[]", f"hub.repo_id={target}", "hub.push_on_end=true"]
    run = train(tiny_cfg(cache_dir, tmp_path / "run", *overrides))
    on_disk = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert on_disk == set(collect_files(run, repo_id=str(target)))
    assert {"README.md", "adapter_model.safetensors", "prompt.json", "eval/final/metrics.json"} <= on_disk
    assert (target / "adapter_model.safetensors").read_bytes() == (
        run / "final" / "adapter_model.safetensors"
    ).read_bytes()

    merge(run / "final", run / "merged")
    push(run, str(target), merged=True)
    assert (target / "merged" / "config.json").is_file()
    assert (target / "merged" / "model.safetensors").read_bytes() == (
        run / "merged" / "model.safetensors"
    ).read_bytes()
    assert 'subfolder="merged"' in (target / "README.md").read_text()


# --------------------------------------------------------------------------------------------- real hub
@pytest.mark.skipif(
    not os.environ.get("VLM_TUNE_REAL_HUB_TOKEN"), reason="opt-in: set VLM_TUNE_REAL_HUB_TOKEN"
)
def test_real_hub_push_private_then_delete(run_dir, tmp_path):
    """Pushes to a new private repo on huggingface.co, checks the file list, deletes the repo."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")
    }
    env.update(HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
    code = f"""
import os, uuid
from huggingface_hub import HfApi
from vlm_tune.hub import push
token = os.environ["VLM_TUNE_REAL_HUB_TOKEN"]
api = HfApi(token=token)
repo = api.whoami()["name"] + "/vlm-tune-test-" + uuid.uuid4().hex[:8]
try:
    push({str(run_dir)!r}, repo, private=True, token=token)
    assert api.model_info(repo).private
    files = set(api.list_repo_files(repo))
    assert {{"adapter_model.safetensors", "prompt.json", "README.md", "eval/final/metrics.json"}} <= files, files
    head = api.model_info(repo).sha
    push({str(run_dir)!r}, repo, private=True, token=token)
    assert api.model_info(repo).sha == head, "unchanged re-push made a commit"
finally:
    api.delete_repo(repo, missing_ok=True)
"""
    run_py(code, env)


@pytest.fixture(scope="module")
def lora_run(lora_run, tmp_path_factory):
    """A copy of the shared trained run: pushes write RUN_DIR/README.md, which other tests must not see."""
    import shutil

    copy = tmp_path_factory.mktemp("hubrun") / "run"
    shutil.copytree(lora_run, copy)
    return copy


# --------------------------------------------------------------------------------------------- software
RECORDED = {
    "vlm-tune": "0.1.0",
    "python": "3.11.7",
    "torch": "2.13.0",
    "transformers": "5.25.0",
    "trl": "1.16.0",
    "peft": "0.21.2",
    "accelerate": "1.16.0",
    "torchvision": "0.28.0",
}


def test_model_card_records_the_versions_and_image_backend_of_the_evaluation(run_dir):
    """The card's Software section is what eval/final/metrics.json recorded; another eval's differences named."""
    for name, extra in {
        "final": {"versions": RECORDED, "torch_cuda": "13.0", "image_backend": "torchvision"},
        "untrained": {
            "versions": RECORDED | {"transformers": "5.24.0"},
            "torch_cuda": "13.0",
            "image_backend": "pil",
        },
    }.items():
        path = run_dir / "eval" / name / "metrics.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | extra))
    card = build_model_card(run_dir, REPO)
    software = card[card.index("## Software") : card.index("## Use it")]
    assert "As recorded by the `final` evaluation (`eval/final/metrics.json`)" in software
    for row in [
        "| vlm-tune | 0.1.0 |",
        "| python | 3.11.7 |",
        "| torch | 2.13.0 (CUDA 13.0 build) |",
        "| transformers | 5.25.0 |",
        "| trl | 1.16.0 |",
        "| peft | 0.21.2 |",
        "| accelerate | 1.16.0 |",
        "| torchvision | 0.28.0 |",
        "| image processors | torchvision |",
    ]:
        assert row in software, row
    assert "`untrained` ran with other software: transformers 5.24.0, image processors pil." in software


def test_model_card_says_when_no_versions_were_recorded_and_names_the_pil_backend(run_dir):
    assert "recorded no library versions" in build_model_card(run_dir)
    path = run_dir / "eval" / "final" / "metrics.json"
    record = {"versions": RECORDED | {"torchvision": None}, "torch_cuda": None, "image_backend": "pil"}
    path.write_text(json.dumps(json.loads(path.read_text()) | record))
    card = build_model_card(run_dir)
    assert "| torch | 2.13.0 (CPU build) |" in card and "| torchvision | not installed |" in card
    assert "| image processors | pil |" in card and "PIL image processors" in card


# --------------------------------------------------------------------------------------------- card precision
def test_card_snippet_loads_in_the_dtype_the_run_was_evaluated_in(tmp_path):
    """`dtype: auto` resolves per machine: the card loads the base in the dtype the final evaluation ran in
    (bfloat16 on the GPU that trained it), not float32; a concrete model.dtype is used as configured."""
    import copy

    auto = copy.deepcopy(CONFIG)
    auto["model"]["dtype"] = "auto"
    metrics = copy.deepcopy(METRICS)
    metrics["final"]["dtype"] = "bfloat16"
    code = python_block(build_model_card(make_run(tmp_path / "a", auto, metrics), REPO))
    assert f'from_pretrained("{BASE}", dtype=torch.bfloat16)' in code
    metrics["final"]["dtype"] = "float32"  # evaluated on a CPU
    code = python_block(build_model_card(make_run(tmp_path / "b", auto, metrics), REPO))
    assert f'from_pretrained("{BASE}", dtype=torch.float32)' in code
    fp16 = copy.deepcopy(CONFIG)
    fp16["model"]["dtype"] = "float16"
    code = python_block(build_model_card(make_run(tmp_path / "c", fp16, metrics), REPO))
    assert f'from_pretrained("{BASE}", dtype=torch.float16)' in code


@pytest.mark.slow
def test_qlora_card_snippet_loads_the_4bit_base_and_answers_like_vlm_tune(cache_dir, tmp_path):
    """A QLoRA adapter was trained and evaluated on a 4-bit base: the card's snippet loads that base in 4-bit
    (the same BitsAndBytesConfig) and gives vlm-tune's own answer (bitsandbytes runs 4-bit on CPU)."""
    from PIL import Image

    from tests.conftest import tiny_cfg
    from vlm_tune.hub import push
    from vlm_tune.inference import load_for_inference, predict
    from vlm_tune.metrics import clean_generation
    from vlm_tune.train import train

    run = train(tiny_cfg(cache_dir, tmp_path / "q", "train.method=qlora", "train.max_steps=2"))
    dest = tmp_path / "pushed"
    push(run, str(dest))
    snippet = python_block((dest / "README.md").read_text())
    assert "BitsAndBytesConfig(" in snippet and "quantization_config=bnb" in snippet
    assert "bitsandbytes" in (dest / "README.md").read_text().split("## Use it", 1)[1].split("```", 1)[0]
    image = tmp_path / "chart.png"
    Image.new("RGB", (64, 64), (0, 160, 40)).save(image)
    question = "How many bars are there?"
    snippet = snippet.rsplit("\nprint(", 1)[0].replace(
        "skip_special_tokens=True", "skip_special_tokens=False"
    )
    snippet += "\nprint(type(model.base_model.model.model.text_model.layers[0].self_attn.q_proj.base_layer).__name__)"
    snippet += f"\nprint(repr(answer([Image.open({str(image)!r}).convert('RGB')], {question!r})))\n"
    (tmp_path / "snippet.py").write_text(snippet.replace('repo = "ORG/NAME"', f"repo = {str(dest)!r}"))
    r = subprocess.run(
        [sys.executable, str(tmp_path / "snippet.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    layer, answer = r.stdout.strip().splitlines()[-2:]
    assert layer == "Linear4bit"
    model, processor, prompt = load_for_inference(run / "final")
    expected = predict(
        model, processor, prompt, [{"images": [Image.open(image).convert("RGB")], "question": question}]
    )
    assert clean_generation(ast.literal_eval(answer)) == expected[0]
