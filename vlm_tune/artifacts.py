"""What a saved model directory (adapter, merged model) must not carry from the machine that wrote it.

transformers writes the loading flags of the session into the saved processor/tokenizer files
(`"local_files_only": true`, `"is_local": true` when trained offline); peft records the base model as given,
so a relative local path (`.cache/vlm-tune/tiny-model`) only resolves from the training directory.
`make_portable(dir)` removes those flags and makes a local base path absolute (hub ids stay as they are).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LOADING_FLAGS = frozenset(
    {
        "local_files_only",
        "is_local",
        "cache_dir",
        "force_download",
        "proxies",
        "token",
        "use_auth_token",
        "resume_download",
        "_commit_hash",
        "_from_auto",
    }
)
PROCESSOR_FILES = (
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "special_tokens_map.json",
)


def _without_flags(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_flags(v) for k, v in value.items() if k not in LOADING_FLAGS}
    if isinstance(value, list):
        return [_without_flags(v) for v in value]
    return value


def make_portable(directory: str | Path) -> None:
    """Strip session loading flags from the processor files; absolute local base path in adapter_config."""
    directory = Path(directory)
    for name in PROCESSOR_FILES:
        path = directory / name
        if path.is_file():
            data = json.loads(path.read_text())
            clean = _without_flags(data)
            if clean != data:
                path.write_text(json.dumps(clean, indent=2, ensure_ascii=False) + "\n")
    adapter_cfg = directory / "adapter_config.json"
    if adapter_cfg.is_file():
        data = json.loads(adapter_cfg.read_text())
        base = data.get("base_model_name_or_path")
        if base and Path(base).is_dir() and not Path(base).is_absolute():
            data["base_model_name_or_path"] = str(Path(base).resolve())
            adapter_cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
