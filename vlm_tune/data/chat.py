"""The prompt contract: the one function that turns a row into chat messages for train, eval and predict.

A row is a dict with canonical fields (see `vlm_tune.data.sources`): `images` (list of PIL images, in
order), `question`, `answers` (list of gold strings; training uses the first), optionally `messages`
(a conversational row: system/user/assistant turns whose content lists hold image and text parts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROMPT_FILE = "prompt.json"


def template_problems(template: str, key: str = "prompt.user_template") -> list[str]:
    """What is wrong with a user template: it must hold {question} and no other placeholder; literal braces
    are written doubled, `{{` and `}}` (str.format rules). Empty list = valid."""
    import string

    try:
        specs = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        return [
            f"{key}: unpaired brace ({err}); write a literal {{ as {{{{ and }} as }}}}, e.g. "
            "'Reply as JSON {{\"answer\": ...}}'"
        ]
    problems = []
    unknown = [
        "{" + f + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        for f, spec, conv in specs
        if f != "question" or spec or conv
    ]
    if unknown:
        problems.append(
            f"{key}: unknown placeholder(s) {', '.join(unknown)}; only {{question}} is replaced. "
            "Write literal braces doubled: {{ and }}"
        )
    if not any(f.split(".")[0].split("[")[0] == "question" for f, _, _ in specs):
        problems.append(f"{key}: must contain {{question}}")
    return problems


def build_messages(
    row: dict[str, Any], system: str | None, user_template: str, with_answer: bool = True
) -> list[dict[str, Any]]:
    """Row → messages, every content a list of parts. with_answer=False drops the final assistant turn (for
    generation).

    A plain-string content becomes one text part: SmolVLM's published chat template renders only content lists
    (it silently drops the text of a string content), and every other family's renders both alike."""
    if row.get("messages"):
        messages = [
            {**m, "content": [{"type": "text", "text": m["content"]}]}
            if isinstance(m["content"], str)
            else dict(m)
            for m in row["messages"]
        ]
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        if not with_answer and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return messages

    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    # all images first, in order (frames of a video stay in temporal order), then the question
    content: list[dict[str, Any]] = [{"type": "image"} for _ in row["images"]]
    content.append({"type": "text", "text": user_template.format(question=row["question"])})
    messages.append({"role": "user", "content": content})
    if with_answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": row["answers"][0]}]})
    return messages


def save_prompt(
    directory: str | Path, system: str | None, user_template: str, answer_format: str = "plain"
) -> Path:
    """Write the prompt contract next to an adapter, so inference can reproduce training's prompt and take the
    answer as the run did (`answer_format`: plain, or tagged = inside the last `<answer>...</answer>`)."""
    path = Path(directory) / PROMPT_FILE
    contract = {"system": system, "user_template": user_template, "answer_format": answer_format}
    path.write_text(json.dumps(contract, indent=2) + "\n")
    return path


def load_prompt(directory: str | Path) -> dict[str, Any] | None:
    """The saved prompt contract of an adapter directory, or None if it has none. One written before the answer
    format was saved reads as plain."""
    path = Path(directory) / PROMPT_FILE
    if not path.is_file():
        return None
    prompt = json.loads(path.read_text())
    if isinstance(prompt, dict):
        prompt.setdefault("answer_format", "plain")
    return prompt
