"""Progress bars for the phases a user waits on: each evaluation (with answers/s) and push."""

from vlm_tune.config import load_config


def test_eval_shows_answers_per_second(lora_run_copy, capsys):
    from vlm_tune.inference import run_eval

    run_eval(load_config(lora_run_copy / "config.yaml", ["logging.progress=true"]), name="progress")
    err = capsys.readouterr().err
    assert "eval progress" in err and "8/8" in err and "answers/s" in err


def test_eval_without_progress_is_silent(lora_run_copy, capsys):
    from vlm_tune.inference import run_eval

    run_eval(load_config(lora_run_copy / "config.yaml", ["logging.progress=false"]), name="quiet")
    assert "answers/s" not in capsys.readouterr().err


def test_push_to_a_directory_shows_bytes_and_files(lora_run_copy, tmp_path, capsys):
    from vlm_tune.hub import collect_files, push

    push(lora_run_copy, str(tmp_path / "pushed"))
    err = capsys.readouterr().err
    n = len(collect_files(lora_run_copy, repo_id=str(tmp_path / "pushed")))
    assert "push" in err and f"{n} files" in err
