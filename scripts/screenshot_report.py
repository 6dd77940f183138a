#!/usr/bin/env python
"""Render an HTML report to PNG with headless Chromium.

Usage: python scripts/screenshot_report.py REPORT.html OUT.png [--window-size 1200,1600]

The browser is looked up as ``chromium``, ``chromium-browser`` or ``google-chrome`` on PATH.
It runs with a fresh throw-away profile and background networking switched off; the report is
self-contained, so nothing is fetched. Exit codes: 0 ok, 2 no browser / bad input, 1 render failed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    """Path of the first Chromium-like browser on PATH, or None."""
    for name in BROWSER_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(report: Path, out: Path, window_size: str = "1200,1600", timeout: float = 120.0) -> Path:
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError(
            f"no Chromium found on PATH (looked for {', '.join(BROWSER_NAMES)}); "
            "install one, e.g. `apt-get install -y chromium` on Debian"
        )
    report = report.resolve()
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="screenshot-profile-") as profile:
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={out}",
            f"--window-size={window_size}",
            report.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        raise RuntimeError(
            f"{Path(browser).name} exited with {proc.returncode} and wrote no screenshot:\n{tail}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="HTML file to render")
    parser.add_argument("out", type=Path, help="PNG file to write")
    parser.add_argument("--window-size", default="1200,1600", help="WIDTH,HEIGHT in CSS pixels")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        print(f"error: {args.report} does not exist", file=sys.stderr)
        return 2
    try:
        out = screenshot(args.report, args.out, args.window_size, args.timeout)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
