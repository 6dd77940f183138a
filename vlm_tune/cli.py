"""`vlm-tune` command line. Every command taking CONFIG also takes `section.key=value` overrides after it.

User mistakes exit with code 2 and a message (no traceback; `--debug` shows it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from typing import Any

from vlm_tune import __version__
from vlm_tune.errors import UserError
from vlm_tune.protocols import HARNESSES as HARNESS_CHOICES
from vlm_tune.protocols import PROTOCOL_NAMES as PROTOCOL_CHOICES

EXAMPLES = """examples:
  vlm-tune train configs/quickstart.yaml
  vlm-tune train configs/quickstart.yaml train.learning_rate=1e-3 lora.r=16 --overwrite
  vlm-tune train configs/quickstart.yaml --resume
  vlm-tune check configs/smolvlm-256m-chartqa.yaml --dump rows.jsonl --rows 5
  vlm-tune eval configs/quickstart.yaml --name final
  vlm-tune eval configs/smolvlm-256m-chartqa.yaml --base --protocol vlmevalkit --export vlmevalkit
  vlm-tune predict --adapter runs/quickstart/final --image chart.png --question "How many bars are there?"
"""


def _quiet() -> None:
    """Silence library chatter that says nothing to a user of this tool."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.utils.data")
    try:
        import datasets

        datasets.disable_progress_bars()
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _config(args: argparse.Namespace) -> Any:
    from vlm_tune.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args)  # config mistakes are reported before the heavy imports
    from vlm_tune.train import train

    if args.resume is not None and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other; use one")
    train(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vlm_tune.inference import run_eval

    metrics = run_eval(
        cfg,
        adapter=args.adapter,
        base=args.base,
        split=args.split,
        limit=args.limit,
        name=args.name,
        protocol=args.protocol,
        export=args.export,
    )
    print(json.dumps(_summary(metrics)))
    return 0


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The line `eval` and `rescore` print: overall scores, the protocol's score per split, files exported."""
    keys = ("n", "exact_match", "relaxed_accuracy", "relaxed_accuracy_strict", "score")
    out: dict[str, Any] = {"protocol": (metrics.get("protocol") or {}).get("name")}
    out |= {k: metrics[k] for k in keys if k in metrics}
    out["by_split"] = {k: v.get("score") for k, v in (metrics.get("by_split") or {}).items()}
    if metrics.get("exports"):
        out["exports"] = metrics["exports"]
    return out


def cmd_rescore(args: argparse.Namespace) -> int:
    from vlm_tune.rescore import rescore

    print(json.dumps(_summary(rescore(args.eval_dir, args.protocol, args.out, args.export or []))))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vlm_tune.check import run_check

    return run_check(cfg, dump=args.dump, rows=args.rows)


def cmd_predict(args: argparse.Namespace) -> int:
    from vlm_tune.inference import predict_cli

    return predict_cli(args)


def cmd_push(args: argparse.Namespace) -> int:
    from vlm_tune.hub import push

    where = push(args.run_dir, args.repo_id, private=args.private, revision=args.revision, merged=args.merged)
    print(where)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from vlm_tune.inference import merge

    print(merge(args.adapter_dir, args.out_dir))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from vlm_tune.data.synthetic import save_synthetic

    path = save_synthetic(
        args.out_dir,
        n_train=args.n_train,
        n_test=args.n_test,
        seed=args.seed,
        image_size=args.image_size,
        chart_kinds=tuple(args.chart_kinds.split(",")),
        question_types=tuple(args.question_types.split(",")),
    )
    print(path)
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from vlm_tune.families import all_families
    from vlm_tune.families.smolvlm import build_tiny_model

    if args.family == "smolvlm":
        print(build_tiny_model(args.out_dir, seed=args.seed))
        return 0
    fam = next(f for f in all_families() if f.name == args.family)
    print(fam.build_stand_in(args.out_dir, seed=args.seed))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from vlm_tune.config import describe_schema

    if args.config:
        print(_config(args).to_yaml(), end="")
    else:
        print(describe_schema())
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from vlm_tune.environment import env_report, format_env

    report = env_report()
    print(json.dumps(report, indent=2) if args.json else format_env(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-tune",
        description="Fine-tune vision-language models for chart question answering.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"vlm-tune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("config", nargs=None if required else "?", help="YAML config file")
        p.add_argument(
            "overrides", nargs="*", help="section.key=value overrides, e.g. train.learning_rate=1e-4"
        )

    p = sub.add_parser("train", help="train (and evaluate) from a config")
    with_config(p)
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="PATH",
        help="continue from the latest complete checkpoint in run.output_dir, or from PATH",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="generate answers on a split and score them")
    with_config(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--adapter", help="adapter directory (default: RUN_DIR/final)")
    g.add_argument("--base", action="store_true", help="evaluate the base model without adapter")
    p.add_argument("--split", help="split to evaluate (default: data.eval_split)")
    p.add_argument("--limit", type=int, help="only the first N rows")
    p.add_argument("--name", help="results go to RUN_DIR/eval/NAME (default: final or base)")
    p.add_argument(
        "--protocol",
        choices=PROTOCOL_CHOICES,
        help="prompt, decoding, post-processing and metric (default: eval.protocol, vlm-tune)",
    )
    p.add_argument(
        "--export",
        action="append",
        choices=HARNESS_CHOICES,
        help="also write this harness's sample/prediction files (repeatable; default: eval.export)",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "rescore", help="score an evaluation's saved generations under another protocol (no model needed)"
    )
    p.add_argument("eval_dir", help="an eval directory (predictions.jsonl, metrics.json)")
    p.add_argument("--protocol", required=True, choices=PROTOCOL_CHOICES)
    p.add_argument("--out", help="output eval directory (default: EVAL_DIR-PROTOCOL beside it)")
    p.add_argument("--export", action="append", choices=HARNESS_CHOICES, help="as for eval (repeatable)")
    p.set_defaults(func=cmd_rescore)

    p = sub.add_parser("check", help="pre-flight: data, token budget and supervision, no training")
    with_config(p)
    p.add_argument(
        "--dump", metavar="FILE", help="write JSON lines (id, answer, input_ids, labels, text) here"
    )
    p.add_argument("--rows", type=int, default=5, help="rows to dump (default 5)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("predict", help="answer questions about images with a trained adapter")
    p.add_argument("--adapter", required=True, help="adapter directory or hub repo id")
    p.add_argument("--image", action="append", default=[], help="image path (repeat for several)")
    p.add_argument("--frames", help="folder of video frames (sorted by name)")
    p.add_argument("--question", help="the question")
    p.add_argument("--batch", metavar="JSONL", help="JSONL with image(s) and question per line")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print a JSON object with 'answer'")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("push", help="push a run's adapter, processor, prompt, metrics and model card")
    p.add_argument("run_dir")
    p.add_argument("--repo-id", required=True, help="ORG/NAME, or a local directory / file:// URL")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="branch (created if missing)")
    p.add_argument("--merged", action="store_true", help="push RUN_DIR/merged (from `vlm-tune merge`) too")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("merge", help="merge an adapter into its base model")
    p.add_argument("adapter_dir")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("synth", help="write a synthetic chart-QA dataset (save_to_disk)")
    p.add_argument("out_dir")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--chart-kinds", default="bar", help="comma-separated: bar,line,pie")
    p.add_argument(
        "--question-types",
        default="count,color_max",
        help="comma-separated: count,color_max,color_min,label_max,label_min,compare,value",
    )
    p.set_defaults(func=cmd_synth)

    from vlm_tune.families import all_families

    p = sub.add_parser(
        "tiny-model", help="build a family's offline tiny stand-in (random weights, tiny dims)"
    )
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--family",
        default="smolvlm",
        choices=[f.name for f in all_families()],
        help="model family (default smolvlm); the result loads with AutoModelForImageTextToText",
    )
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("config", help="print every config key with its default, or a resolved config")
    with_config(p, required=False)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "env",
        help="versions in use (python, torch, libraries, image backend) and how they differ from the lock",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_env)
    return parser


OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")
CONFIG_COMMANDS = {"train", "eval", "check", "config"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # overrides may come before or after flags: `train cfg.yaml --overwrite lora.r=16`
    overrides: list[str] = []
    if any(a in CONFIG_COMMANDS for a in argv[:2]):
        overrides = [a for a in argv if OVERRIDE.match(a)]
        argv = [a for a in argv if not OVERRIDE.match(a)]
    args = parser.parse_args(argv)
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + overrides
    _quiet()
    try:
        return args.func(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
