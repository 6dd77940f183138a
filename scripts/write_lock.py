"""Write this environment's freeze as vlm-tune's lock (run by scripts/test_latest.sh --write-lock).

    VENV/bin/python scripts/write_lock.py --out vlm_tune/requirements.lock --torchvision 0.28.0 --command "..."

Every installed distribution but pip and vlm-tune itself, at its installed version (local labels dropped:
`torch==2.13.0`), under a header naming the date, python, platform, command and the GPU stack's torchvision.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import subprocess
import sys
from pathlib import Path

from vlm_tune.versions import format_lock, parse_lock

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def freeze() -> dict[str, str]:
    """name → version of this interpreter's environment, as `pip freeze` reports it."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable", "--exclude", "pip"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    pins: dict[str, str] = {}
    for line in out.splitlines():
        if not line.strip() or line.startswith(("#", "-e")):
            continue
        m = PIN.match(line.strip())
        if not m:
            sys.exit(
                f"write_lock: {line!r} is not `name==version` (a direct URL install?); install it by version"
            )
        pins[m.group(1)] = m.group(2)
    pins.pop("vlm-tune", None)
    return pins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--torchvision", required=True, help="torchvision version of the GPU stack")
    parser.add_argument("--command", required=True, help="the command that wrote the lock, for the header")
    args = parser.parse_args()
    pins = freeze()
    if "torch" not in pins:
        sys.exit("write_lock: torch is not installed here")
    header = {
        "written": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "platform": platform.platform(),
        "command": args.command,
        "gpu": f"torchvision=={args.torchvision}",
    }
    text = format_lock(pins, header)
    lock = parse_lock(text, args.out)  # what is written reads back
    args.out.write_text(text)
    print(f"wrote {args.out}: {len(lock.pins)} packages, torch=={lock.pins['torch']}, gpu {header['gpu']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
