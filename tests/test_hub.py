"""Pushing a run: model card, local-directory target, and a round trip through a local hub stand-in.

The server in tests/hub_server.py stands in for huggingface.co's HTTP API (repo creation, preupload,
commit, branches, repo info and downloads) as huggingface_hub's client speaks it; no real hub is reachable
here. Pushes run in subprocesses because huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at import.
"""

import json
import os
import subprocess
import sys

import pytest
import yaml

from vlm_tune.errors import UserError
from vlm_tune.hub import build_model_card, collect_files, push

from .hub_server import start_server

TOKEN = "hf_testtoken_5f3a9c"


@pytest.fixture(scope="module")
def hub():
    server, state, endpoint = start_server()
    yield state, endpoint
    server.shutdown()


def hub_env(endpoint, home):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    return {
        **env,
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": TOKEN,
        "HF_HOME": str(home),
    }


def run_py(code, env, check=True):
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=check)


def test_model_card(lora_run):
    card = build_model_card(lora_run)
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and front["pipeline_tag"] == "image-text-to-text"
    assert "vlm-tune" in front["tags"]
    final = json.loads((lora_run / "eval" / "final" / "metrics.json").read_text())
    assert f"| final | all | {final['n']} | {final['exact_match']:.3f} |" in card
    assert "PeftModel.from_pretrained" in card and "import vlm_tune" not in card
    assert "Answer with a single word or number." in card  # the prompt contract, verbatim
    assert card.index("| final |") < card.index("| untrained |")


def test_push_to_local_directory_is_idempotent(lora_run, tmp_path):
    target = tmp_path / "hubdir"
    assert push(lora_run, str(target)) == str(target)
    pushed = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert pushed == set(collect_files(lora_run)) | {"README.md"}
    assert (
        "eval/final/metrics.json" in pushed
        and "prompt.json" in pushed
        and "adapter_model.safetensors" in pushed
    )
    stamps = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    push(lora_run, f"file://{target}")
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*")} == stamps, (
        "unchanged re-push rewrites nothing"
    )


def test_missing_final_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="train first"):
        push(tmp_path, str(tmp_path / "out"))
    with pytest.raises(UserError, match="vlm-tune merge"):
        (tmp_path / "final").mkdir()
        (tmp_path / "final" / "prompt.json").write_text("{}")
        collect_files(tmp_path, merged=True)


@pytest.mark.slow
def test_round_trip_through_local_hub(lora_run, hub, tmp_path):
    state, endpoint = hub
    env = hub_env(endpoint, tmp_path / "hf")
    push_code = f"from vlm_tune.hub import push; print(push({str(lora_run)!r}, 'me/chart-lora'))"
    out = run_py(push_code, env)
    assert state.commit_count("me/chart-lora") == 1
    auth = [
        {k.lower(): v for k, v in r["headers"].items()}.get("authorization")
        for r in state.requests
        if r["method"] == "POST"
    ]
    assert auth and all(a == f"Bearer {TOKEN}" for a in auth)

    dl = tmp_path / "dl"
    run_py(
        f"from huggingface_hub import snapshot_download; snapshot_download('me/chart-lora', local_dir={str(dl)!r})",
        env,
    )
    expected = collect_files(lora_run)
    for rel, src in expected.items():
        assert (dl / rel).read_bytes() == src.read_bytes(), rel
    card = (dl / "README.md").read_text()
    for text in [out.stdout, out.stderr, card] + [
        p.read_text(errors="ignore") for p in dl.rglob("*") if p.is_file()
    ]:
        assert TOKEN not in text

    # unchanged re-push: no new commit
    run_py(push_code, env)
    assert state.commit_count("me/chart-lora") == 1

    # the downloaded adapter answers like the local one (plain transformers + peft in `predict`)
    img = tmp_path / "c.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (0, 160, 40)).save(img)
    answers = []
    for adapter in (lora_run / "final", dl):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "vlm_tune.cli",
                "predict",
                "--adapter",
                str(adapter),
                "--image",
                str(img),
                "--question",
                "How many bars are there?",
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        answers.append(json.loads(r.stdout.strip().splitlines()[-1])["answer"])
    assert answers[0] == answers[1]


@pytest.mark.slow
def test_failed_commit_then_retry_completes(lora_run, hub, tmp_path):
    state, endpoint = hub
    env = hub_env(endpoint, tmp_path / "hf")
    state.fail_commits = 1
    code = f"from vlm_tune.hub import push; print(push({str(lora_run)!r}, 'me/retry'))"
    first = run_py(code, env, check=False)
    assert first.returncode != 0 and state.commit_count("me/retry") == 0
    run_py(code, env)
    assert state.commit_count("me/retry") == 1
    files = set(state.head("me/retry", "main")["files"])
    assert files == set(collect_files(lora_run)) | {"README.md"}


@pytest.mark.slow
def test_push_to_branch_and_cli(lora_run, hub, tmp_path):
    state, endpoint = hub
    env = hub_env(endpoint, tmp_path / "hf")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlm_tune.cli",
            "push",
            str(lora_run),
            "--repo-id",
            "me/branchy",
            "--revision",
            "v1",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert state.commit_count("me/branchy", "v1") == 1 and state.commit_count("me/branchy", "main") == 0


def test_offline_push_is_a_clear_error(lora_run, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": TOKEN}
    r = subprocess.run(
        [sys.executable, "-m", "vlm_tune.cli", "push", str(lora_run), "--repo-id", "me/x"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "HF_HUB_OFFLINE=1" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(
    not os.environ.get("VLM_TUNE_REAL_HUB_TOKEN"), reason="opt-in: set VLM_TUNE_REAL_HUB_TOKEN"
)
def test_real_hub_push(lora_run, tmp_path):
    """Pushes to a private repo on the real hub, then deletes it (needs the network and a write token)."""
    token = os.environ["VLM_TUNE_REAL_HUB_TOKEN"]
    code = f"""
import uuid
from huggingface_hub import HfApi
from vlm_tune.hub import push
api = HfApi(token={token!r})
repo = api.whoami()["name"] + "/vlm-tune-test-" + uuid.uuid4().hex[:8]
try:
    push({str(lora_run)!r}, repo, private=True, token={token!r})
    assert "adapter_model.safetensors" in api.list_repo_files(repo)
finally:
    api.delete_repo(repo)
"""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    run_py(code, env)


@pytest.mark.slow
def test_push_on_end_and_merged(cache_dir, tmp_path):
    from vlm_tune.inference import merge
    from vlm_tune.train import train

    from .conftest import tiny_cfg

    target = tmp_path / "pushed"
    run = train(
        tiny_cfg(
            cache_dir,
            tmp_path / "run",
            "train.max_steps=2",
            "eval.baselines=[]",
            f"hub.repo_id={target}",
            "hub.push_on_end=true",
        )
    )
    assert (target / "adapter_model.safetensors").read_bytes() == (
        run / "final" / "adapter_model.safetensors"
    ).read_bytes()
    assert (target / "README.md").is_file() and (target / "eval" / "final" / "metrics.json").is_file()
    merge(run / "final", run / "merged")
    push(run, str(target), merged=True)
    assert (target / "merged" / "model.safetensors").is_file() and (
        target / "merged" / "config.json"
    ).is_file()
