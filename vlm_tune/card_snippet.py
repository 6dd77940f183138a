"""The loading snippet of a model card: Python that answers a chart question with the published model using
only transformers (+ peft for an adapter, + bitsandbytes for QLoRA), with the run's dtype, image knobs,
prompt layout and end-of-turn token, so it answers as the evaluated model did; a tagged run's snippet takes the
answer inside the last `<answer>...</answer>` as evaluation does (`vlm_tune.protocols.answer_of`)."""

from __future__ import annotations

import json
from typing import Any

from vlm_tune.families.base import Family


def _snippet_dtype(cfg: dict[str, Any], evaluated: str | None) -> str:
    """The dtype the card loads the model in: the run's own (`model.dtype`, or for `auto` the dtype its
    final evaluation ran in, as metrics.json recorded it), so the snippet answers like the evaluated model."""
    configured = (cfg.get("model") or {}).get("dtype")
    for name in (configured, evaluated):
        if name in ("float32", "bfloat16", "float16"):
            return name
    return "float32"


def _quantization_lines(dtype: str, fam: Family) -> list[str]:
    """`bnb = BitsAndBytesConfig(...)`: the 4-bit settings vlm-tune trained and evaluated a QLoRA run with."""
    import torch

    from vlm_tune.model import quantization_config

    q = quantization_config(getattr(torch, dtype), fam)
    return [
        "bnb = BitsAndBytesConfig(  # the 4-bit base this QLoRA adapter was trained and evaluated on",
        f"    load_in_4bit=True, bnb_4bit_quant_type={q.bnb_4bit_quant_type!r}, "
        f"bnb_4bit_use_double_quant={q.bnb_4bit_use_double_quant},",
        f"    bnb_4bit_compute_dtype=torch.{dtype}, llm_int8_skip_modules={list(q.llm_int8_skip_modules)!r},",
        ")",
    ]


# the tagged answer format: the vlm-tune post-processing (`metrics.clean_generation`) of the text inside the last
# <answer>...</answer>, written with the standard library only (a test runs it against `protocols.answer_of`)
TAGGED_ANSWER_LINES = [
    "def answer_in(text):",
    '    """The answer of a reasoning completion: inside its last <answer>...</answer> ("" without one)."""',
    '    found = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)',
    '    prefix = re.compile(r"^\\s*assistant\\s*:", flags=re.IGNORECASE)  # a leading "Assistant:" is dropped',
    '    lines = prefix.sub("", found[-1], count=1).splitlines() if found else []',
    '    return next((line for line in (prefix.sub("", x, count=1).strip() for x in lines) if line), "")',
]


def model_card_snippet(
    repo: str,
    base: str,
    cfg: dict[str, Any],
    is_adapter: bool,
    fam: Family,
    evaluated: str | None = None,
    answer_format: str = "plain",
) -> list[str]:
    """The snippet's lines; `answer_format` tagged (prompt.json) adds `answer_in` and generates as many tokens as
    the evaluation did (eval.max_new_tokens), since the reasoning comes before the answer."""
    tagged = answer_format == "tagged"
    model_cfg = cfg.get("model") or {}
    dtype = _snippet_dtype(cfg, evaluated)
    qlora = is_adapter and (cfg.get("train") or {}).get("method") == "qlora"
    image = model_cfg.get("image") or {}
    max_new = int((cfg.get("eval") or {}).get("max_new_tokens") or 16) if tagged else 16
    code = [
        "import json",
        *(["import re"] if tagged else []),
        "from pathlib import Path",
        "",
        "import torch",
        "from huggingface_hub import snapshot_download  # installed with transformers",
        "from PIL import Image",
    ]
    code += ["from peft import PeftModel"] if is_adapter else []
    code += [
        "from transformers import AutoModelForImageTextToText, AutoProcessor"
        + (", BitsAndBytesConfig" if qlora else ""),
        "",
        f"repo = {json.dumps(repo)}",
        "path = repo if Path(repo).is_dir() else snapshot_download(repo)",
        'prompt = json.loads(Path(path, "prompt.json").read_text())  # the prompt contract used in training',
        "processor = AutoProcessor.from_pretrained(path)",
    ]
    code += fam.card_image_lines(image)  # the family's resolution knobs, as vlm-tune set them
    if qlora:
        code += _quantization_lines(dtype, fam)
        code += [
            'device = "cuda" if torch.cuda.is_available() else "cpu"',
            f"model = AutoModelForImageTextToText.from_pretrained({json.dumps(base)}, dtype=torch.{dtype}, "
            'quantization_config=bnb, device_map={"": device})',
            "model = PeftModel.from_pretrained(model, path).eval()",
        ]
    elif is_adapter:
        code += [
            f"model = AutoModelForImageTextToText.from_pretrained({json.dumps(base)}, dtype=torch.{dtype})",
            "model = PeftModel.from_pretrained(model, path).eval()",
        ]
    else:
        code.append(f"model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.{dtype}).eval()")
    if not qlora:  # a 4-bit model is placed where it was loaded
        code.append('model = model.to("cuda" if torch.cuda.is_available() else "cpu")')
    code += ["", ""] + (TAGGED_ANSWER_LINES + ["", ""] if tagged else [])
    code += ["def answer(images, question):"]
    code += fam.card_input_lines or [  # the family's prompt layout (a prefix-LM has no chat template)
        "    messages = []",
        '    if prompt["system"]:',
        '        messages.append({"role": "system", "content": [{"type": "text", "text": prompt["system"]}]})',
        '    content = [{"type": "image"} for _ in images]  # all images first, then the text',
        '    content.append({"type": "text", "text": prompt["user_template"].format(question=question)})',
        '    messages.append({"role": "user", "content": content})',
        "    text = processor.apply_chat_template(messages, add_generation_prompt=True)",
        "    # the template wrote the special tokens (Gemma 3: <bos>); the tokenizer must not add them again",
        '    inputs = processor(text=[text], images=[images], add_special_tokens=False, return_tensors="pt")',
        "    inputs = inputs.to(model.device)",
    ]
    code += [
        '    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)',
        f"    end = processor.tokenizer.convert_tokens_to_ids({json.dumps(fam.end_of_turn)})  # closes an answer",
        "    eos = [end, processor.tokenizer.eos_token_id]",
        "    with torch.no_grad():",
        f"        out = model.generate(**inputs, max_new_tokens={max_new}, do_sample=False, eos_token_id=eos)",
        '    new = out[0, inputs["input_ids"].shape[1] :]',
        "    return answer_in(processor.decode(new, skip_special_tokens=True))"
        if tagged
        else "    return processor.decode(new, skip_special_tokens=True).strip()",
        "",
        "",
        'print(answer([Image.open("chart.png").convert("RGB")], "Which year has the highest value?"))',
    ]
    return code
