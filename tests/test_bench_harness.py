"""scripts/bench_harness.py on its own: offline, deterministic (a fake clock, trivially fast functions)."""

import argparse
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _harness():
    spec = importlib.util.spec_from_file_location("bench_harness", ROOT / "scripts" / "bench_harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_harness", module)  # as the scripts import it (dataclasses look it up)
    spec.loader.exec_module(module)
    return module


h = _harness()


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_time_repeats_excludes_the_warmup_calls():
    clock = FakeClock()
    costs = iter([100.0, 50.0, 1.0, 2.0, 3.0])  # two slow warm-up calls, then the timed ones
    calls = []

    def fn():
        calls.append(clock())
        clock.advance(next(costs))

    assert h.time_repeats(fn, warmup=2, repeats=3, clock=clock) == [1.0, 2.0, 3.0]
    assert len(calls) == 5


def test_timed_window_starts_after_the_warmup_steps():
    ends = [0.0, 10.0, 11.0, 12.0, 13.0]  # step ends; steps 0 and 1 are slow (warm-up)
    assert h.timed_window(ends, 2) == (3.0, 3, 2)  # steps 2..4, from the end of step 1
    assert h.timed_window(ends, 0) == (13.0, 4, 1)  # the first step's end starts the clock
    assert h.timed_window(ends, 99) == (1.0, 1, 4)  # at least one timed step: the last


def test_alternate_runs_arms_in_turn_and_repeats_are_aggregated():
    clock = FakeClock()
    order = []
    cost = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 5.0, 6.0])}

    def arm(name):
        def run():
            order.append(name)
            seconds = next(cost[name])
            clock.advance(seconds)
            return {"rate": 10 / seconds, "peak": seconds * 100}

        return run

    seen = []
    runs = h.alternate({"a": arm("a"), "b": arm("b")}, 3, clock=clock, on_run=lambda *r: seen.append(r[:3]))
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert [s for s, _ in runs["a"]] == [3.0, 1.0, 2.0]
    assert seen[:2] == [("a", 0, 3.0), ("b", 0, 5.0)] and seen[-1] == ("b", 2, 6.0)
    agg = h.aggregate_repeats([r for _, r in runs["a"]], "rate", "peak")
    assert agg["rate"] == 5.0  # the median repeat (2 s of 1, 2, 3 s)
    assert agg["rate_repeats"] == [round(10 / 3, 3), 10.0, 5.0]  # every repeat, in run order
    assert agg["peak"] == 300.0  # the highest of all repeats, not the median repeat's
    # an even count: the lower of the two middle repeats (a real repeat, not an average)
    assert h.aggregate_repeats([{"rate": 1.0}, {"rate": 4.0}], "rate")["rate"] == 1.0
    assert h.median([1.0, 4.0, 2.0]) == 2.0


def test_json_report_is_written_after_every_record(tmp_path):
    clock = FakeClock()
    budget = h.Budget(100.0, clock=clock)
    out = tmp_path / "sub" / "bench.json"
    report = h.JsonReport(out, {"device": "cpu", "steps": 2}, budget)
    clock.advance(7.0)
    report.add({"variant": "default", "samples_per_s": 1.5})
    data = json.loads(out.read_text())
    assert data == {
        "device": "cpu",
        "steps": 2,
        "results": [{"variant": "default", "samples_per_s": 1.5}],
        "elapsed_s": 7.0,
    }
    assert budget.left() == 93.0
    report.add({"variant": "gc_on", "error": "OOM"})
    assert [r["variant"] for r in json.loads(out.read_text())["results"]] == ["default", "gc_on"]
    h.write_json(tmp_path / "b.json", {"z": 1, "a": 2}, sort_keys=True)
    assert (tmp_path / "b.json").read_text() == '{\n  "a": 2,\n  "z": 1\n}\n'
    assert h.json_line({"z": 1, "a": 2}) == 'JSON: {"a": 2, "z": 1}'


def test_ratios_are_against_the_baseline_arm():
    ours = {"samples_per_s": 6.0, "tokens_per_s": 30.0, "peak_mem_mb": 50.0}
    base = {"samples_per_s": 4.0, "tokens_per_s": 0, "peak_mem_mb": 100.0}
    got = h.ratios(ours, base, ["samples_per_s", "tokens_per_s", "peak_mem_mb", "missing"])
    assert got == {"samples_per_s": 1.5, "peak_mem_mb": 0.5}  # no ratio over a zero or missing baseline
    line = h.ratio_line("vlm-tune", "baseline", "samples/s", got["samples_per_s"])
    assert line == "vlm-tune/baseline samples/s ratio: 1.50"
    assert re.fullmatch(
        r"after/before answers/s ratio: \d+\.\d\d", h.ratio_line("after", "before", "answers/s", 2)
    )
    assert h.fmt(None, ".2f") == "-" and h.fmt(1.234, ".2f") == "1.23"


def test_add_bench_options_parses_the_shared_options():
    ap = h.add_bench_options(
        argparse.ArgumentParser(), warmup=3, repeats=2, json_flag="--out", json_default="x.json", isolate=True
    )
    args = ap.parse_args([])
    assert (args.warmup, args.repeats, args.out, args.isolate, args.device) == (3, 2, "x.json", False, "auto")
    assert args.cache_dir == ".cache/vlm-tune" and args.result is None
    args = ap.parse_args(["--isolate", "--warmup", "0", "--device", "cpu", "--result", "r.json"])
    assert (args.isolate, args.warmup, args.device, args.result) == (True, 0, "cpu", "r.json")
    bare = h.add_bench_options(argparse.ArgumentParser(), device=False).parse_args([])
    assert not hasattr(bare, "device") and not hasattr(bare, "warmup") and not hasattr(bare, "isolate")


CHILD = """
import os, sys
sys.path.insert(0, {scripts!r})
import argparse, bench_harness as h
ap = h.add_bench_options(argparse.ArgumentParser(), device=False)
ap.add_argument("--variant")
args = ap.parse_args()
if args.variant == "broken":
    raise SystemExit("broken variant")
h.write_result(args, {{"variant": args.variant, "pid": os.getpid(), "peak_rss_mb": h.peak_rss_mb()}})
"""


def test_run_isolated_runs_a_variant_in_a_fresh_process(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(scripts=str(ROOT / "scripts")))
    child = h.run_isolated(script, ["--variant", "gc_on"])
    assert child.returncode == 0, child.stderr
    assert child.result["variant"] == "gc_on"
    assert child.result["pid"] != os.getpid()  # its own process, so its peak memory is its own
    assert child.result["peak_rss_mb"] > 0
    failed = h.run_isolated(script, ["--variant", "broken"])
    assert failed.result is None and failed.returncode != 0 and "broken variant" in failed.stderr


def test_run_variant_records_errors_wall_time_and_child_peak_rss(capsys):
    ok = h.run_variant(
        {"variant": "a"}, lambda: {"samples_per_s": 2.0}, tag="[t] a", device="cpu", child=True
    )
    assert ok["samples_per_s"] == 2.0 and ok["wall_s"] >= 0 and ok["peak_rss_gb"] > 0

    def boom():
        raise MemoryError("out of memory")

    bad = h.run_variant({"variant": "b"}, boom, tag="[t] b", device="cpu", child=False)
    assert bad["error"] == "MemoryError: out of memory" and "peak_rss_gb" not in bad
    assert "MemoryError" in bad["traceback_tail"]
    assert "[t] b: FAILED MemoryError: out of memory" in capsys.readouterr().out


def test_peak_memory_without_a_gpu_is_this_process_rss(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # no torch imported: nothing ran on a GPU
    assert h.peak_gpu_mb() is None
    mb, kind = h.peak_memory()
    assert kind == "peak RSS (ru_maxrss)" and mb == pytest.approx(h.peak_rss_mb(), rel=0.5) and mb > 1
