"""Evaluation protocols: the prompt, decoding, post-processing and metric of the public ChartQA harnesses.

A protocol fixes what moves a ChartQA score besides the model (`eval.protocol`, `vlm-tune eval --protocol`):

| protocol | user text | system prompt | decoding | post-processing | metric (`score`) |
|---|---|---|---|---|---|
| `vlm-tune` | the run's `prompt.user_template` | the run's | greedy, `eval.max_new_tokens` | `clean_generation` | robust relaxed accuracy |
| `lmms-eval` | question + "\\nAnswer the question with a single word." | none | greedy, 16 | none (raw) | pix2struct check, first gold, no strip |
| `vlmevalkit` | question + "\\nAnswer the question using a single word or phrase." (SmolVLM/SmolVLM2: their wrappers' ChartQA prompt) | none | greedy, 2048 | `.strip()` | pix2struct check, prediction stripped, max over golds |

The run's answer format (`ANSWER_FORMATS`, saved in prompt.json) changes the vlm-tune row only: with `tagged`
the prediction is the text inside the last `<answer>...</answer>` (no tags: empty, scored 0), then
`clean_generation` (`answer_of`, the GRPO reward's own extraction); lmms-eval and vlmevalkit score the whole
generation, as those harnesses do.

Sources (read for this module; facts, not code): lmms-eval 0.7.3 from PyPI, `lmms_eval/tasks/chartqa/chartqa.yaml`
and `utils.py` (the same prompt at commit 38eb0f31 of EvolvingLMMs-Lab/lmms-eval; an earlier revision, 0dc9a47a,
said "using a single word or phrase" and gave qwen_vl no suffix); VLMEvalKit (open-compass/VLMEvalKit, no PyPI
release) `vlmeval/dataset/image_vqa.py` (ImageVQADataset.build_prompt), `vlmeval/dataset/utils/vqa_eval.py`
(process_line, relaxed_correctness, hit_calculate) and `vlmeval/vlm/smolvlm.py` (build_prompt_chartqa, read at
commits 23757c43 and 0140aceb).

lmms-eval's task scores the backend's response as given: its generic `huggingface` chat backend (the one for
families without a dedicated backend, SmolVLM among them) decodes with special tokens skipped and strips nothing,
so an answer generated after SmolVLM's "Assistant:" keeps its leading space; some dedicated backends strip.

Model-specific prompts, kept here with the model types they apply to:
- lmms-eval picks a task's model-specific prompt by the `--model` backend name (`api/task.py`,
  `_prepare_model_specific_config`). ChartQA's only one is `qwen_vl` (" Answer:"), the backend of the first
  Qwen-VL; Qwen2.5-VL and Qwen3-VL run as `qwen2_5_vl` / `qwen3_vl` and get the default prompt, so no vlm-tune
  family gets " Answer:" (`LMMS_EVAL_MODELS` maps each model type to the backend a user would run).
- VLMEvalKit's SmolVLM (model type `idefics3`) and SmolVLM2 (`smolvlm`) wrappers put a list of instructions
  before "Question: " and the dataset's question text; the two differ in one byte pair (U+2019 vs ASCII
  apostrophe). Idefics3-8B checkpoints share model type `idefics3` but VLMEvalKit runs them with its IDEFICS2
  wrapper: vlm-tune cannot tell them apart and uses the SmolVLM prompt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlm_tune.errors import UserError
from vlm_tune.metrics import (
    END_OF_TURN_MARKERS,
    clean_generation,
    lmms_eval_relaxed,
    relaxed_accuracy,
    vlmevalkit_relaxed,
)

PROTOCOL_NAMES = ("vlm-tune", "lmms-eval", "vlmevalkit")
HARNESSES = ("lmms-eval", "vlmevalkit")
ANSWER_FORMATS = ("plain", "tagged")
"""The run's answer format (`rl.answer_format` of a GRPO run, else plain; saved in prompt.json): tagged = the
answer is the text inside the last `<answer>...</answer>` (`answer_of`)."""

_TAGGED = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_TAGGED_STEP = "the text inside the last <answer>...</answer> (no tags: an empty prediction, scored 0)"

_VLMEVALKIT_SUFFIX = "\nAnswer the question using a single word or phrase."


def _smolvlm_chartqa(apostrophe: str) -> str:
    """VLMEvalKit's SmolVLM/SmolVLM2 ChartQA_TEST user text (build_prompt_chartqa), with {question}."""
    rules = (
        "The answer should contain as few words as possible.",
        f"Don{apostrophe}t paraphrase or reformat the text you see in the image.",
        "Answer a binary question with Yes or No.",
        "When asked to give a numerical value, provide a number like 2 instead of Two.",
        "If the final answer has two or more items, provide it in the list format like [1, 2].",
        "When asked to give a ratio, give out the decimal value like 0.25 instead of 1:4.",
        "When asked to give a percentage, give out the whole value like 17 instead of decimal like 0.17%.",
        f"Don{apostrophe}t include any units in the answer.",
        "Do not include any full stops at the end of the answer.",
        "Try to include the full label from the graph when asked about an entity.",
    )
    head = "For the question below, follow the following instructions:\n" + "".join(f"-{r}\n" for r in rules)
    return head + "Question: {question}" + _VLMEVALKIT_SUFFIX


LMMS_EVAL_MODELS = {
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "gemma3": "gemma3",
    "internvl": "internvl_hf",
}
"""model_type → the lmms-eval `--model` backend for it (others: a generic backend); all get the default prompt."""


@dataclass(frozen=True)
class Protocol:
    """One harness's ChartQA setting. `user_template` None: the run's prompt contract (and its system prompt)."""

    name: str
    source: str
    user_template: str | None
    max_new_tokens: int | None  # None: eval.max_new_tokens
    postprocessing: str  # what `postprocess` does, in words (recorded in metrics.json)
    metric_name: str
    metric: Callable[[str, Sequence[str]], float]
    post: Callable[[str], str]
    # model_type → (user template, which harness code it reproduces)
    model_templates: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    harness_models: Mapping[str, str] = field(default_factory=dict)

    def postprocess(self, raw: str, special: Iterable[str] = ()) -> str:
        """The prediction this protocol scores, from a raw generation (text up to the end-of-turn token).

        The harnesses decode with special tokens skipped: those in `special` are removed first (vlm-tune keeps
        them, as before)."""
        if self.name != "vlm-tune":
            for token in special:
                raw = raw.replace(token, "")
        return self.post(raw)

    def answer(self, raw: str, special: Iterable[str] = (), answer_format: str = "plain") -> str | None:
        """`postprocess` under the run's answer format: vlm-tune with tagged takes `answer_of` (None: no tags);
        the harnesses score the whole generation, as they do, whatever the format."""
        if self.name == "vlm-tune" and answer_format == "tagged":
            return answer_of(raw, answer_format)
        return self.postprocess(raw, special)

    def postprocessing_for(self, answer_format: str = "plain") -> str:
        """`postprocessing` in words, with what the run's answer format changes (metrics.json)."""
        if answer_format != "tagged":
            return self.postprocessing
        if self.name == "vlm-tune":
            return f"{_TAGGED_STEP}, then {self.postprocessing}"
        return f"{self.postprocessing}; the run's tagged answer format is not applied (scored as the harness does)"


PROTOCOLS: dict[str, Protocol] = {
    "vlm-tune": Protocol(
        name="vlm-tune",
        source="vlm-tune: the run's prompt contract (prompt.json)",
        user_template=None,
        max_new_tokens=None,
        postprocessing="cut at the end-of-turn token, drop a leading 'Assistant:', first non-empty line, stripped",
        metric_name="relaxed accuracy, robust (vlm_tune.metrics.relaxed_accuracy), max over gold answers",
        metric=relaxed_accuracy,
        post=clean_generation,
    ),
    "lmms-eval": Protocol(
        name="lmms-eval",
        source="lmms-eval 0.7.3, lmms_eval/tasks/chartqa/{chartqa.yaml,utils.py} (task chartqa)",
        user_template="{question}\nAnswer the question with a single word.",
        max_new_tokens=16,
        postprocessing="none: the decoded continuation up to the end-of-turn token, special tokens removed, "
        "not stripped (as lmms-eval's generic huggingface backend returns it; some dedicated backends strip)",
        metric_name="lmms-eval relaxed_correctness(prediction, first gold answer), nothing stripped",
        metric=lmms_eval_relaxed,
        post=lambda raw: raw,
        harness_models=LMMS_EVAL_MODELS,
    ),
    "vlmevalkit": Protocol(
        name="vlmevalkit",
        source="VLMEvalKit ChartQA_TEST: vlmeval/dataset/image_vqa.py, vlmeval/dataset/utils/vqa_eval.py",
        user_template="{question}" + _VLMEVALKIT_SUFFIX,
        max_new_tokens=2048,  # VLMEvalKit fixes none per task; its SmolVLM/SmolVLM2 wrappers' default
        postprocessing="the decoded continuation, special tokens removed, .strip()",
        metric_name="VLMEvalKit relaxed_correctness(gold, prediction.strip()), max over gold answers",
        metric=vlmevalkit_relaxed,
        post=str.strip,
        model_templates={
            "idefics3": (_smolvlm_chartqa("\u2019"), "VLMEvalKit SmolVLM wrapper (vlmeval/vlm/smolvlm.py)"),
            "smolvlm": (_smolvlm_chartqa("'"), "VLMEvalKit SmolVLM2 wrapper (vlmeval/vlm/smolvlm.py)"),
        },
    ),
}


def get_protocol(protocol: str | Protocol | None) -> Protocol:
    """A protocol by name (None: vlm-tune); an unknown name is a UserError naming the valid ones."""
    if isinstance(protocol, Protocol):
        return protocol
    name = protocol or "vlm-tune"
    if name not in PROTOCOLS:
        raise UserError(f"eval.protocol {name!r}: unknown; use one of {', '.join(PROTOCOL_NAMES)}")
    return PROTOCOLS[name]


@dataclass(frozen=True)
class Setting:
    """A protocol resolved for one model and run: exactly what generation and scoring use."""

    protocol: Protocol
    system: str | None
    user_template: str
    max_new_tokens: int
    model_type: str | None
    model_specific: str | None  # the harness code whose model-specific prompt is used, if any
    training: dict[str, Any]  # the run's prompt contract: system, user_template
    answer_format: str = "plain"  # the run's (ANSWER_FORMATS): where the vlm-tune protocol finds the answer

    @property
    def differs_from_training(self) -> bool:
        return (self.system, self.user_template) != (self.training["system"], self.training["user_template"])

    def record(self) -> dict[str, Any]:
        """The `protocol` entry of metrics.json."""
        p = self.protocol
        return {
            "name": p.name,
            "source": p.source,
            "system_prompt": self.system,
            "user_template": self.user_template,
            "model_type": self.model_type,
            "model_specific_prompt": self.model_specific,
            "harness_model": p.harness_models.get(self.model_type or ""),
            "decoding": {"greedy": True, "max_new_tokens": self.max_new_tokens},
            "postprocessing": p.postprocessing_for(self.answer_format),
            "answer_format": self.answer_format,
            "metric": p.metric_name,
            "differs_from_training": self.differs_from_training,
            "training_prompt": dict(self.training),
        }


def resolve(
    protocol: str | Protocol | None,
    model_type: str | None,
    system: str | None,
    user_template: str,
    max_new_tokens: int,
    answer_format: str = "plain",
) -> Setting:
    """The setting of `protocol` for a model of `model_type` whose run was trained with (system, user_template)
    and answers in `answer_format`."""
    p = get_protocol(protocol)
    template, specific = p.user_template, None
    if model_type in p.model_templates:
        template, specific = p.model_templates[model_type]
    return Setting(
        protocol=p,
        system=system if p.user_template is None else None,
        user_template=user_template if template is None else template,
        max_new_tokens=p.max_new_tokens or max_new_tokens,
        model_type=model_type,
        model_specific=specific,
        training={"system": system, "user_template": user_template},
        answer_format=check_answer_format(answer_format),
    )


def check_answer_format(answer_format: Any, where: str = "answer_format") -> str:
    """`answer_format` when it is one of ANSWER_FORMATS, else a UserError naming them."""
    if answer_format not in ANSWER_FORMATS:
        raise UserError(f"{where} {answer_format!r}: unknown; use one of {', '.join(ANSWER_FORMATS)}")
    return str(answer_format)


def answer_of(raw: str, answer_format: str = "plain") -> str | None:
    """The answer in a raw generation (special tokens kept) that the vlm-tune protocol scores and the GRPO reward
    pays: cut at the end of turn; tagged: the text inside the last `<answer>...</answer>` (None without one);
    then the vlm-tune post-processing (`clean_generation`)."""
    text = cut_at_end_of_turn(raw)
    if answer_format == "tagged":
        found = _TAGGED.findall(text)
        if not found:
            return None
        text = found[-1]
    return clean_generation(text)


def cut_at_end_of_turn(text: str) -> str:
    """A generation up to its first end-of-turn marker, nothing else changed (the raw answer every protocol
    post-processes; `generate_answers(postprocess=...)`)."""
    cut = min((i for i in (text.find(m) for m in END_OF_TURN_MARKERS) if i != -1), default=len(text))
    return text[:cut]


def special_tokens_in(tokenizer: Any, texts: Iterable[str]) -> list[str]:
    """The tokenizer's special tokens that occur in texts, longest first (removed in that order)."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials |= {t.content for t in decoder.values() if getattr(t, "special", False)}
    texts = list(texts)
    return sorted((s for s in specials if s and any(s in t for t in texts)), key=lambda s: (-len(s), s))


def model_type_of(model: Any) -> str | None:
    """config.model_type of a model (a PEFT wrapper looked through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "model_type", None)


_IMAGE_KEYS = (
    "size",
    "max_image_size",
    "do_resize",
    "do_image_splitting",
    "min_pixels",
    "max_pixels",
    "patch_size",
    "merge_size",
    "crop_to_patches",
    "min_patches",
    "max_patches",
    "do_pan_and_scan",
    "pan_and_scan_max_num_crops",
    "min_image_tokens",
    "max_image_tokens",
    "tile_size",
)


def image_settings(processor: Any) -> dict[str, Any]:
    """The image processor's resolution settings in use (class name + the keys it has), for metrics.json."""
    ip = getattr(processor, "image_processor", None)
    if ip is None:
        return {}
    out: dict[str, Any] = {"class": type(ip).__name__}
    for key in _IMAGE_KEYS:
        value = getattr(ip, key, None)
        if value is not None:
            out[key] = json.loads(json.dumps(value, default=str))
    return out
