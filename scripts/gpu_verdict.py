"""gpu_check.sh's verdict: did every product command succeed, and did everything run on the device?

    python scripts/gpu_verdict.py RUN_DIR DEVICE STEPS_TSV SUMMARY_JSON OK

Reads every RUN_DIR/eval/*/metrics.json (`devices`: all parameters and buffers of the evaluated model; the
majority baseline has no model), the `predict` answer's JSON line (its `devices`, in predict.log beside
STEPS_TSV) and RUN_DIR/merged/merge.json. A model evaluation, predict or merge with any tensor off DEVICE, a
missing evaluation or a step that exited non-zero is a problem. Writes SUMMARY_JSON; exit 0 only without
problems and with OK=1 (the script's own tally).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

EVALS = ("untrained", "majority", "during", "final", "cli")
KEEP = (
    "device",
    "devices",
    "dtype",
    "rows",
    "wall_s",
    "answers_per_s",
    "n",
    "exact_match",
    "relaxed_accuracy",
)


def on_device(devices: Any, device: str) -> bool:
    """Every tensor on `device` (cuda: any cuda index); an empty or missing record is not."""
    return bool(devices) and all(str(d).startswith(device) for d in devices)


def verdict(run: Path, device: str, steps: Path, ok: bool) -> dict[str, Any]:
    """The summary: device, ok, problems, per-step exit codes, every evaluation, where predict/merge ran."""
    evals: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for path in sorted(run.glob("eval/*/metrics.json")):
        m = json.loads(path.read_text())
        name = path.parent.name
        evals[name] = {k: m.get(k) for k in KEEP}
        if name == "majority":
            if m.get("device") is not None:
                problems.append(f"majority: device {m.get('device')!r}, expected null (no model)")
        elif not on_device(m.get("devices"), device):
            problems.append(f"{name}: parameters on {m.get('devices')!r}, expected {device} only")
    problems += [f"eval/{name}/metrics.json missing" for name in EVALS if name not in evals]
    commands = [
        dict(zip(("step", "rc", "seconds"), line.split("\t"), strict=True))
        for line in steps.read_text().splitlines()
    ]
    problems += [f"{c['step']} exited {c['rc']}" for c in commands if c["rc"] != "0"]
    log = steps.parent / "predict.log"
    lines = [x for x in (log.read_text().splitlines() if log.is_file() else []) if x.startswith("{")]
    record = run / "merged" / "merge.json"
    ran_on = {
        "predict": json.loads(lines[-1]).get("devices") if lines else None,
        "merge": json.loads(record.read_text()).get("devices") if record.is_file() else None,
    }
    problems += [
        f"{k}: ran on {v!r}, expected {device} only" for k, v in ran_on.items() if not on_device(v, device)
    ]
    if not (run / "merged" / "config.json").is_file():
        problems.append("merge wrote no merged/config.json")
    return {
        "device": device,
        "ok": ok and not problems,
        "problems": problems,
        "commands": commands,
        "evaluations": evals,
        "ran_on": ran_on,
    }


def main(argv: list[str]) -> int:
    run, device, steps, summary, ok = argv
    out = verdict(Path(run), device, Path(steps), ok == "1")
    Path(summary).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
