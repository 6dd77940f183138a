"""Cache writers under concurrency (vlm_tune.cache): several writers publishing the same build at once, as the
ranks of a run or the machines sharing a cache do, never fail, never delete a build in use, and a reader never
sees a partial build."""

import json
import threading
from pathlib import Path

from vlm_tune.standins.scaffold import save_built_model

WRITERS = 6


class FakeBuild:
    """Stands in for a model and its processor: save_pretrained writes files, slowly enough to overlap."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def save_pretrained(self, folder: Path) -> None:
        for i in range(4):
            (Path(folder) / f"part{i}.bin").write_bytes(self.payload)


def _race(out: Path, spec: dict) -> list[BaseException]:
    """WRITERS threads call save_built_model(out) with the same build at the same moment; their errors."""
    start, errors = threading.Barrier(WRITERS), []

    def write() -> None:
        start.wait()
        try:
            save_built_model(FakeBuild(b"x" * 200_000), FakeBuild(b"p"), out, "tiny_spec.json", spec)
        except BaseException as err:  # noqa: BLE001 - collected and asserted on below
            errors.append(err)

    threads = [threading.Thread(target=write) for _ in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_writers_of_one_build_all_succeed_and_readers_see_it_whole(tmp_path):
    out, spec = tmp_path / "tiny-model", {"build": 1}
    seen, stop = [], threading.Event()

    def read() -> None:  # what another rank does meanwhile: a marker means a complete build
        while not stop.is_set():
            try:
                marker = json.loads((out / "tiny_spec.json").read_text())
            except (OSError, ValueError):
                continue
            seen.append((marker, sorted(p.name for p in out.iterdir())))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        errors = _race(out, spec)
    finally:
        stop.set()
        reader.join()
    assert errors == [], errors
    assert json.loads((out / "tiny_spec.json").read_text()) == spec
    whole = ["part0.bin", "part1.bin", "part2.bin", "part3.bin", "tiny_spec.json"]
    assert sorted(p.name for p in out.iterdir()) == whole
    assert all(files == whole for _, files in seen), "a reader saw a partial build"
    # the first build published stays; the others were dropped, nothing moved aside, no staging left
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny-model.lock", "tiny-model"]


def test_concurrent_writers_replace_an_earlier_build_once(tmp_path):
    out = tmp_path / "tiny-model"
    assert _race(out, {"build": 1}) == []
    errors = _race(out, {"build": 2})  # every writer finds the earlier build and rebuilds
    assert errors == [], errors
    assert json.loads((out / "tiny_spec.json").read_text()) == {"build": 2}
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".tiny-model.old-")]
    assert len(aside) == 1, "the earlier build moved aside once; a fresh build is never replaced"
    assert json.loads((aside[0] / "tiny_spec.json").read_text()) == {"build": 1}
    assert not list(tmp_path.glob(".tiny-model.tmp-*")), "no staging left"
