"""The one harness of the bench scripts (bench_train.py, bench_gpu.py, bench_eval.py): what they share.

* options: `add_bench_options` adds --cache-dir, --device, --warmup, --repeats, the JSON file option and
  --isolate (each script picks the ones it has); `resolve_device` applies --device;
* timing: `time_repeats` (warm-up calls, then timed repeats), `timed_window` (the steps after the warm-up,
  from step-end timestamps), `step_timer` (a TrainerCallback recording them), `alternate` (arms run in
  turn, --repeats times, so a slow spell on a shared machine hits every arm), `aggregate_repeats`;
* peak memory: `peak_rss_mb` (this process) and `peak_gpu_mb` (torch.cuda.max_memory_allocated);
* output: `write_json`, `json_line`, `JsonReport` (written again after every record, so a timeout keeps
  what was measured), `ratios` / `ratio_line` (an arm against the baseline measured in the same run);
* isolation: `run_isolated` runs a script again in a fresh process that writes its result to the file
  named by --result (`write_result`); `run_variant` runs one variant, recording its error (e.g. out of
  memory) instead of stopping the run, its wall time and, in an isolated child, its process's peak RSS.

It lives beside the scripts, not in `vlm_tune`: it is benchmark tooling, not part of the installed tool;
the scripts put their own folder on sys.path to import it (so they run from any directory, and the tests
load them by path).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULT_FLAG = "--result"
Clock = Callable[[], float]

# ---------------------------------------------------------------------------------------------------------
# options and device


def add_bench_options(
    ap: argparse.ArgumentParser,
    *,
    device: bool = True,
    warmup: int | None = None,
    warmup_help: str = "first steps, not timed",
    repeats: int | None = None,
    repeats_help: str = "runs of each arm, alternating; medians reported",
    json_flag: str | None = None,
    json_default: str | None = None,
    isolate: bool = False,
    isolate_help: str = "each variant in its own process: peak memory per variant (peak RSS on CPU)",
) -> argparse.ArgumentParser:
    """Add the shared options a script has (None / False: it has not), and the hidden --result of a child."""
    ap.add_argument("--cache-dir", default=".cache/vlm-tune")
    if device:
        ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    if warmup is not None:
        ap.add_argument("--warmup", type=int, default=warmup, help=f"{warmup_help} (default {warmup})")
    if repeats is not None:
        ap.add_argument("--repeats", type=int, default=repeats, help=f"{repeats_help} (default {repeats})")
    if json_flag:
        what = f"default {json_default}" if json_default else "also printed as the JSON: line"
        ap.add_argument(json_flag, default=json_default, help=f"write the results as JSON here ({what})")
    if isolate:
        ap.add_argument("--isolate", action="store_true", help=isolate_help)
    # set by run_isolated: this process is a child, and writes its result JSON to this file
    ap.add_argument(RESULT_FLAG, default=None, help=argparse.SUPPRESS)
    return ap


def resolve_device(ap: argparse.ArgumentParser, requested: str) -> str:
    """'cuda' or 'cpu' for --device: cpu hides the GPUs (before CUDA starts); cuda needs a visible one."""
    if requested == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    device = "cuda" if torch.cuda.is_available() and requested != "cpu" else "cpu"
    if requested == "cuda" and device != "cuda":
        ap.error("--device cuda: no CUDA device visible")
    return device


def device_name(device: str) -> str:
    """The GPU's name, or 'N-core CPU'."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()}-core CPU"


def quiet() -> None:
    """Offline, no progress bars, no advisory warnings: the bench output is the measurements."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore")
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def sync(device: str) -> None:
    """Wait for the GPU's queued work (a no-op on CPU), so a timestamp means the work is done."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------
# timing


class Budget:
    """Seconds since start and seconds left of a time budget."""

    def __init__(self, budget: float, clock: Clock = time.perf_counter) -> None:
        self.clock = clock
        self.t0 = clock()
        self.budget = budget

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()


def time_repeats(
    fn: Callable[[], Any],
    *,
    warmup: int = 1,
    repeats: int = 3,
    clock: Clock = time.perf_counter,
    device: str = "cpu",
) -> list[float]:
    """Seconds of each of `repeats` timed calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        sync(device)
        t = clock()
        fn()
        sync(device)
        seconds.append(clock() - t)
    return seconds


def timed_window(step_ends: Sequence[float], warmup: int) -> tuple[float, int, int]:
    """(seconds, steps, first) of the steps after the warm-up, from step-end timestamps.

    Steps first..n-1 (0-based) are timed, from the end of step first-1: the warm-up, at least one step
    (its end starts the clock) and at most n-1 steps.
    """
    first = max(min(warmup, len(step_ends) - 1), 1)
    return step_ends[-1] - step_ends[first - 1], len(step_ends) - first, first


def step_timer(device: str) -> Any:
    """A TrainerCallback recording each step's begin and (after a GPU sync) end: `.begins`, `.times`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.begins: list[float] = []
            self.times: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.begins.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync(device)
            self.times.append(time.perf_counter())

    return StepTimer()


def alternate(
    arms: dict[str, Callable[[], Any]],
    repeats: int,
    clock: Clock = time.perf_counter,
    on_run: Callable[[str, int, float, Any], None] | None = None,
) -> dict[str, list[tuple[float, Any]]]:
    """Run every arm once per repeat, in turn; per arm, each repeat's (seconds, result).

    on_run(arm, repeat, seconds, result) is called after each run (progress lines, checks).
    """
    runs: dict[str, list[tuple[float, Any]]] = {name: [] for name in arms}
    for rep in range(repeats):
        for name, fn in arms.items():
            t = clock()
            result = fn()
            runs[name].append((clock() - t, result))
            if on_run is not None:
                on_run(name, rep, runs[name][-1][0], result)
    return runs


def median(values: Sequence[float]) -> float:
    """The median of the repeats' values."""
    return statistics.median(values)


def aggregate_repeats(runs: list[dict[str, Any]], key: str, peak_key: str | None = None) -> dict[str, Any]:
    """The repeat with the median `key` (the lower one of an even count), plus `key`_repeats (every
    repeat's, in run order) and, if given, the highest `peak_key` of all repeats."""
    ordered = sorted(runs, key=lambda r: r[key])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out[f"{key}_repeats"] = [round(r[key], 3) for r in runs]
    if peak_key:
        out[peak_key] = max(r[peak_key] for r in runs)
    return out


# ---------------------------------------------------------------------------------------------------------
# peak memory


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MB (ru_maxrss: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float | None:
    """torch.cuda.max_memory_allocated in MB; None without a GPU (or before torch was imported)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def reset_peak_gpu() -> None:
    """Start a new torch.cuda.max_memory_allocated window (no-op without a GPU)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> tuple[float, str]:
    """(MB, what was measured): the GPU's peak allocation when there is one, else this process's peak RSS."""
    gpu = peak_gpu_mb()
    if gpu is not None:
        return gpu, "torch.cuda.max_memory_allocated"
    return peak_rss_mb(), "peak RSS (ru_maxrss)"


# ---------------------------------------------------------------------------------------------------------
# output


def write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False) -> Path:
    """Write obj as indented JSON (creating the folder); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")
    return out


def json_line(obj: Any) -> str:
    """The one-line form printed in a bench's output: 'JSON: {...}' (sorted keys)."""
    return "JSON: " + json.dumps(obj, sort_keys=True)


class JsonReport:
    """A JSON report {header..., results: [...], elapsed_s}, written again after every added record."""

    def __init__(self, path: str | os.PathLike, header: dict[str, Any], budget: Budget) -> None:
        self.path = Path(path)
        self.budget = budget
        self.data: dict[str, Any] = {**header, "results": []}

    @property
    def results(self) -> list[dict[str, Any]]:
        return self.data["results"]

    def add(self, record: dict[str, Any]) -> None:
        self.results.append(record)
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = self.budget.elapsed()
        write_json(self.path, self.data)


def fmt(value: Any, spec: str) -> str:
    """A measurement formatted for a table: '-' when there is none."""
    return "-" if value is None else format(value, spec)


def ratios(arm: dict[str, Any], baseline: dict[str, Any], keys: Sequence[str]) -> dict[str, float]:
    """arm[k] / baseline[k] for each key both have (the baseline's non-zero), measured in the same run."""
    return {k: arm[k] / baseline[k] for k in keys if baseline.get(k) and arm.get(k) is not None}


def ratio_line(arm: str, baseline: str, what: str, value: float) -> str:
    """'ARM/BASELINE WHAT ratio: X.XX', the last line of a bench's output."""
    return f"{arm}/{baseline} {what} ratio: {value:.2f}"


# ---------------------------------------------------------------------------------------------------------
# isolation


@dataclass
class ChildRun:
    """What an isolated child left: its result JSON (None if it wrote none), exit code and output."""

    result: Any
    returncode: int
    stdout: str
    stderr: str


def run_isolated(script: str | os.PathLike, argv: Sequence[str]) -> ChildRun:
    """Run `python script *argv --result FILE` in a fresh process (its peak memory is its own)."""
    with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), *argv, RESULT_FLAG, str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        result = json.loads(out.read_text()) if out.is_file() else None
    return ChildRun(result, proc.returncode, proc.stdout, proc.stderr)


def write_result(args: argparse.Namespace, result: Any) -> None:
    """In an isolated child: hand the result to the parent (the --result file)."""
    write_json(getattr(args, RESULT_FLAG.lstrip("-")), result)


def run_variant(
    record: dict[str, Any], fn: Callable[[], dict[str, Any]], *, tag: str, device: str, child: bool
) -> dict[str, Any]:
    """record updated with fn()'s measurements, or its error; plus wall_s and, in a child, peak_rss_gb."""
    t = time.perf_counter()
    try:
        record.update(fn())
    except Exception as err:  # OOM, a missing package: record it and go on
        record["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        record["traceback_tail"] = traceback.format_exc()[-1500:]
        print(f"{tag}: FAILED {record['error']}", flush=True)
    finally:
        gc.collect()
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()
    record["wall_s"] = time.perf_counter() - t
    if child:  # one variant per process: the process's peak RSS is this variant's
        record["peak_rss_gb"] = peak_rss_mb() / 1024
    return record
