"""The ``diffss`` command line: one subcommand per pipeline stage.

``diffss train`` / ``diffss evaluate`` take every field of :class:`~diffss.train.TrainConfig` /
:class:`~diffss.train.EvalConfig` as an option (``--true-shot 1 --aux-shot 4``) or a JSON file
(``--config run.json``; options override it). ``diffss conditions`` and ``diffss generate`` work on
any dataset that :func:`diffss.data.load_dataset` reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One option per field of a config dataclass (its type and validation stay in the class)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        args = typing.get_args(hint)
        origin = typing.get_origin(hint)
        flag = "--" + field.name.replace("_", "-")
        if field.name in skip or origin is dict:
            continue  # mappings come from the JSON config
        if origin is tuple:
            parser.add_argument(flag, type=int, nargs="+", default=None, help=f"default {field.default}")
            continue
        if origin in (typing.Union, types.UnionType):
            base = next(a for a in args if a is not type(None))
        else:
            base = hint
        if typing.get_origin(base) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(base), default=None, help=f"default {field.default}")
        elif base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"default {field.default}")
        else:
            parser.add_argument(flag, type=base, default=None, help=f"default {field.default}")


def _config_from_args(cls: type, args: argparse.Namespace):
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(json.loads(Path(args.config).read_text()))
    for field in dataclasses.fields(cls):
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = value
    return cls.from_dict(values)


def _dataset_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="demo", help="pascal5i | coco20i | fss1000 | folder | demo")
    parser.add_argument("--root", default=None, help="dataset root (see README for each layout)")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--split", default="test", help="train | test (| val for fss1000)")
    parser.add_argument("--image-size", type=int, default=None, help="resize episodes to this size")


def _dataset_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {"name": args.dataset, "root": args.root, "fold": args.fold, "split": args.split}
    if args.image_size:
        kwargs["image_size"] = args.image_size
    return kwargs


def cmd_train(args: argparse.Namespace) -> int:
    from diffss.train import TrainConfig, train

    config = _config_from_args(TrainConfig, args)
    out = train(config, progress=not args.quiet)
    print(f"checkpoint: {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from diffss.train import EvalConfig, evaluate

    config = _config_from_args(EvalConfig, args)
    result = evaluate(args.checkpoint, config, progress=not args.quiet)
    print(result.per_class.to_string(index=False))
    print(f"mIoU {result.miou:.2f}  FB-IoU {result.fbiou:.2f}")
    if args.output:
        from diffss.atomic import atomic_path

        with atomic_path(args.output) as tmp:
            result.per_class.to_csv(tmp, index=False)
        print(f"per-class table: {args.output}")
    return 0


def _dataset_dir(base: str | None, default: str, args: argparse.Namespace) -> str:
    # Outputs of different datasets never share a folder.
    return base or f"{default}/{args.dataset}"


def cmd_conditions(args: argparse.Namespace) -> int:
    from diffss.conditions import run_conditions

    out = _dataset_dir(args.output, "data/conditions", args)
    table = run_conditions(
        _dataset_kwargs(args),
        kinds=args.kinds,
        out_dir=out,
        resolution=args.resolution,
        hed=args.hed_model,
        progress=not args.quiet,
    )
    print(f"{len(table)} conditions under {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from diffss.generation import GenerationConfig, run_generation

    values = GenerationConfig.from_json(args.generation_config).to_dict() if args.generation_config else {}
    for field in dataclasses.fields(GenerationConfig):
        if getattr(args, field.name, None) is not None:
            values[field.name] = getattr(args, field.name)
    config = GenerationConfig.from_dict(values)
    table = run_generation(
        _dataset_kwargs(args),
        condition=args.condition,
        out_dir=args.output,
        config=config,
        num_aux=args.num_aux,
        conditions_dir=_dataset_dir(args.conditions_dir, "data/conditions", args),
        progress=not args.quiet,
    )
    print(f"{len(table)} auxiliary images under {args.output}/{args.dataset}/{args.condition}")
    return 0


def cmd_tiny_models(args: argparse.Namespace) -> int:
    from diffss.generation import build_tiny_diffusion

    config = build_tiny_diffusion(args.output, seed=args.seed)
    config_path = Path(args.output) / "generation_config.json"
    config.to_json(config_path)
    print(f"tiny random SD + ControlNet under {args.output}; use it with --generation-config {config_path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from diffss.export import export_model_repository

    info = export_model_repository(args.checkpoint, args.output, name=args.name)
    print(json.dumps(info, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from diffss.generation import GenerationConfig
    from diffss.train import EvalConfig, TrainConfig

    parser = argparse.ArgumentParser(prog="diffss", description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="episodic training of a few-shot segmenter")
    p.add_argument("--config", help="TrainConfig as JSON; options override it")
    _add_dataclass_options(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="mIoU / FB-IoU on fixed test episodes")
    p.add_argument("checkpoint", help="checkpoint directory written by `diffss train`")
    p.add_argument("--config", help="EvalConfig as JSON; options override it")
    p.add_argument("--output", help="write the per-class table here (CSV)")
    _add_dataclass_options(p, EvalConfig)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("conditions", help="seg / hed / scribble control conditions for every support")
    _dataset_options(p)
    p.add_argument("--kinds", nargs="+", default=["seg", "hed", "scribble"])
    p.add_argument("--output", default=None, help="default data/conditions/<dataset>")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--hed-model", default="lllyasviel/Annotators", help="hub id or local directory of HED weights")
    p.set_defaults(func=cmd_conditions)

    p = sub.add_parser("generate", help="auxiliary supports with Stable Diffusion + ControlNet")
    _dataset_options(p)
    p.add_argument("--condition", default="seg", help="seg | hed | scribble, or several joined by + (multi-ControlNet)")
    p.add_argument("--num-aux", type=int, default=4, help="auxiliary images per support")
    p.add_argument("--output", default="data/auxiliary")
    p.add_argument("--conditions-dir", default=None, help="where `diffss conditions` wrote them (default data/conditions/<dataset>)")
    p.add_argument("--generation-config", help="GenerationConfig as JSON (e.g. written by `diffss tiny-models`); "
                   "the options below (its fields) override it")
    _add_dataclass_options(p, GenerationConfig)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("tiny-models", help="write tiny random SD + ControlNet models (tests, demo, offline trials)")
    p.add_argument("--output", default="data/models/tiny-sd")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_models)

    p = sub.add_parser("export", help="ONNX model repository (Triton layout) from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--output", default="data/exports/model_repository")
    p.add_argument("--name", default="diffss")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"diffss {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
