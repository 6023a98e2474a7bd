"""The ``diffss`` command line: one subcommand per pipeline stage.

``diffss train`` / ``diffss evaluate`` / ``diffss train-base`` take every field of
:class:`~diffss.train.TrainConfig` / :class:`~diffss.train.EvalConfig` /
:class:`~diffss.train_base.BaseTrainConfig` as an option (``--true-shot 1 --aux-shot 4``) or a
JSON file (``--config run.json``; options override it). ``diffss convert-checkpoint`` turns an
official PFENet / BAM / HSNet checkpoint into a diffss model folder. ``diffss conditions`` and ``diffss generate`` work on
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
        if origin in (typing.Union, types.UnionType):
            base = next(a for a in args if a is not type(None))
        else:
            base = hint
        if typing.get_origin(base) is tuple:
            parser.add_argument(flag, type=int, nargs="+", default=None, help=f"default {field.default}")
        elif typing.get_origin(base) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(base), default=None, help=f"default {field.default}")
        elif base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"default {field.default}")
        else:
            parser.add_argument(flag, type=base, default=None, help=f"default {field.default}")


def _config_from_args(cls: type, args: argparse.Namespace):
    values: dict[str, Any] = {}
    path = getattr(args, "config", None)
    if path:
        try:
            loaded = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"--config {path}: cannot read a JSON {cls.__name__}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path}: expected a JSON object of {cls.__name__} fields, "
                             f"got {type(loaded).__name__}")
        values.update(loaded)
    for field in dataclasses.fields(cls):
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = value
    try:
        return cls.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{exc} (from --config {path} and the options)" if path else str(exc)) from exc


def _dataset_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="demo", help="pascal5i | coco20i | fss1000 | folder | demo")
    parser.add_argument("--root", default=None, help="dataset root (see README for each layout)")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--split", default="test", help="train | test (| val for fss1000)")
    parser.add_argument("--image-size", type=int, default=None, help="resize episodes to this size")
    parser.add_argument("--skip-bad", action="store_true", help="leave out bad samples (counted) instead of failing")


def _dataset_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {"name": args.dataset, "root": args.root, "fold": args.fold, "split": args.split,
              "skip_bad": args.skip_bad}
    if args.image_size:
        kwargs["image_size"] = args.image_size
    return kwargs


def cmd_train(args: argparse.Namespace) -> int:
    from diffss.train import TrainConfig, train

    config = _config_from_args(TrainConfig, args)
    out = train(config, progress=not args.quiet)
    print(f"checkpoint: {out}")
    return 0


def cmd_train_base(args: argparse.Namespace) -> int:
    from diffss.train_base import BaseTrainConfig, train_base

    config = _config_from_args(BaseTrainConfig, args)
    out = train_base(config, progress=not args.quiet)
    print(f"base learner: {out}")
    return 0


def cmd_convert_checkpoint(args: argparse.Namespace) -> int:
    from diffss.models import convert_official_checkpoint

    config: dict[str, Any] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects KEY=JSON, got {item!r}")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value  # a bare string
    for key in ("shot", "backbone", "fold", "dataset"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    paths = [args.checkpoint] + ([args.base_learner] if args.base_learner else [])
    try:
        out = convert_official_checkpoint(args.model, paths, args.output, **config)
    except NotImplementedError as exc:
        raise ValueError(str(exc)) from exc
    print(f"converted {args.model} checkpoint {args.checkpoint} -> {out} (load with diffss.models.load_model)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from diffss.train import EvalConfig, evaluate

    config = _config_from_args(EvalConfig, args)
    result = evaluate(args.checkpoint, config, progress=not args.quiet)
    protocol = result.protocol
    print(f"protocol {protocol['family']}: {protocol['resize']} to {protocol['size'] or 'the dataset size'} px, "
          f"scored at the {protocol['score_at']} size, seeds {list(protocol['seeds'])}")
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
    from diffss.generation import GenerationConfig, dataset_samples, generate_shard

    if args.generation_config and args.preset:
        raise ValueError("give --generation-config or --preset, not both (a preset is a config: "
                         "save GenerationConfig.paper() as JSON to edit it)")
    if args.generation_config:
        values = GenerationConfig.from_json(args.generation_config).to_dict()
    else:
        values = (GenerationConfig.paper() if args.preset == "paper" else GenerationConfig()).to_dict()
    for field in dataclasses.fields(GenerationConfig):
        if getattr(args, field.name, None) is not None:
            values[field.name] = getattr(args, field.name)
    for item in args.controlnet or []:
        kind, sep, model = item.partition("=")
        if not sep or not model:
            raise ValueError(f"--controlnet takes KIND=MODEL (e.g. seg=data/models/controlnet-seg), got {item!r}")
        values["controlnets"] = {**values.get("controlnets", {}), kind: model}
    config = GenerationConfig.from_dict(values)
    samples, dataset = dataset_samples(_dataset_kwargs(args))
    result = generate_shard(
        samples,
        args.condition,
        args.output,
        args.shard,
        config=config,
        num_aux=args.num_aux,
        dataset_name=dataset,
        conditions_dir=_dataset_dir(args.conditions_dir, "data/conditions", args),
        progress=not args.quiet,
    )
    where = "" if result.shard is None else f" (shard {result.shard[0]}/{result.shard[1]})"
    print(f"{len(result.paths)} auxiliary images{where} under {result.folder}: {result.generated} generated, "
          f"{result.kept} kept; table {result.table_path} has {len(result.table)} rows")
    return 0


def cmd_tiny_models(args: argparse.Namespace) -> int:
    from diffss.generation import build_tiny_diffusion

    config = build_tiny_diffusion(args.output, seed=args.seed)
    config_path = Path(args.output) / "generation_config.json"
    config.to_json(config_path)
    print(f"tiny random SD + ControlNet under {args.output}; use it with --generation-config {config_path}")
    return 0


def cmd_train_controlnet(args: argparse.Namespace) -> int:
    from diffss.generation.training import GeneratorTrainConfig, train_generator

    values = {"stage": "controlnet", "conditions": tuple(args.condition.split("+"))}
    for name in ("output_dir", "dataset", "root", "fold", "split", "base_model", "hed_model", "resolution", "steps",
                 "batch_size", "gradient_accumulation_steps", "learning_rate", "mixed_precision", "seed", "device",
                 "checkpoint_every", "local_files_only"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    out = train_generator(GeneratorTrainConfig(**values), progress=not args.quiet)
    print(f"ControlNet: {out} (diffss generate --base-model {values['base_model']} "
          f"{' '.join(f'--controlnet {k}={out}' for k in values['conditions'])} ...)")
    return 0


def _outside_package(output: str | Path, replace_shipped: bool, shipped: Path) -> Path:
    """``output`` unless it lies inside the installed package (its shipped weights): a training
    command writes there only with --replace-shipped, which then writes ``shipped`` itself."""
    if replace_shipped:
        return shipped
    output = Path(output)
    package = Path(__file__).resolve().parent
    if output.resolve() == package or package in output.resolve().parents:
        raise ValueError(f"--output {output} lies inside the installed package ({package}); it would overwrite the "
                         f"weights shipped with diffss. Choose another folder, or pass --replace-shipped to "
                         f"refresh the shipped weights on purpose")
    return output


def cmd_train_generator(args: argparse.Namespace) -> int:
    from diffss.generation.demo_generator import PRETRAINED_DIR, train_demo_generator

    if args.preset != "demo":
        raise ValueError(f"unknown --preset {args.preset!r}; known: demo")
    output = _outside_package(args.output or Path(args.work_dir) / "weights", args.replace_shipped, PRETRAINED_DIR)
    config = train_demo_generator(output_dir=output, work_dir=args.work_dir, seed=args.seed,
                                  steps_scale=args.steps_scale, pool_per_class=args.pool_per_class,
                                  batch_size=args.batch_size, device=args.device, progress=not args.quiet)
    print(f"demo generator: {Path(config.base_model).parent} (generation_config.json there)")
    return 0


def cmd_pretrain_backbone(args: argparse.Namespace) -> int:
    from diffss.data import load_dataset
    from diffss.generation.demo_generator import DEMO_PRESET, build_pretraining_pool
    from diffss.models.backbone import SMALL_DEMO_WEIGHTS
    from diffss.models.pretraining import pretrain_small_backbone

    if args.preset != "demo":
        raise ValueError(f"unknown --preset {args.preset!r}; known: demo")
    output = _outside_package(args.output or Path(args.work_dir) / SMALL_DEMO_WEIGHTS.name, args.replace_shipped,
                              SMALL_DEMO_WEIGHTS)
    pool = build_pretraining_pool(Path(args.work_dir) / "pool", per_class=args.pool_per_class or DEMO_PRESET["pool_per_class"])
    samples = [s for split in ("train", "test") for s in load_dataset("demo", root=pool, fold=0, split=split, episodes=1).samples]
    summary = pretrain_small_backbone(samples, output, steps=args.steps, seed=args.seed, progress=not args.quiet,
                                      run_dir=Path(args.work_dir) / "pretrain-backbone",
                                      checkpoint_every=args.checkpoint_every)
    print(json.dumps({**summary, "output": str(output)}, indent=2))
    return 0


def _study_config(args: argparse.Namespace):
    from diffss.studies import StudyConfig

    values = {k: getattr(args, k) for k in ("root", "output_dir", "fold", "seeds", "steps", "image_size", "batch_size",
                                            "episodes", "device") if getattr(args, k) is not None}
    for name in ("xshot", "paper_aux_shot", "train_aux_shot", "eval_aux_shot", "real_shots"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    return StudyConfig(**values)


def cmd_demo_check(args: argparse.Namespace) -> int:
    from diffss.studies import support_check

    verdict = support_check(_study_config(args), reference_spread=args.reference_spread, progress=not args.quiet)
    print(json.dumps(verdict, indent=2))
    return 0 if verdict["passed"] else 1


def cmd_demo_study(args: argparse.Namespace) -> int:
    from diffss.generation import GenerationConfig
    from diffss.generation.demo_generator import demo_generation_config
    from diffss.studies import demo_study, summary_markdown

    cfg = _study_config(args)
    device = None if cfg.device == "auto" else cfg.device
    generation = (GenerationConfig.from_json(args.generation_config) if args.generation_config
                  else demo_generation_config(args.generator, device=device)) if args.conditions else None
    summary = demo_study(cfg, generation, conditions=args.conditions, oracle=not args.no_oracle,
                         num_aux=args.num_aux, progress=not args.quiet)
    print(summary_markdown(summary))
    print(f"results: {cfg.output_dir}/results.csv, summary.csv, summary.md, auxiliary_grid.png")
    return 0


def _study_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="demo dataset root (FSS-1000 layout)")
    p.add_argument("--output", dest="output_dir", required=True, help="checkpoints, evaluations, tables (resumable)")
    p.add_argument("--fold", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2 3)")
    for flag in ("--steps", "--image-size", "--batch-size", "--episodes"):
        p.add_argument(flag, type=int, default=None)
    p.add_argument("--device", default=None)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from diffss.data import build_demo_dataset

    root = build_demo_dataset(args.root, seed=args.seed, num_classes=args.num_classes, per_class=args.per_class)
    print(f"demo dataset under {root} (use --dataset demo --root {root})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from diffss.export import export_model_repository

    info = export_model_repository(args.checkpoint, args.output, name=args.name)
    print(json.dumps(info, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from diffss.generation import GenerationConfig
    from diffss.train import EvalConfig, TrainConfig
    from diffss.train_base import BaseTrainConfig

    parser = argparse.ArgumentParser(prog="diffss", description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="episodic training of a few-shot segmenter")
    p.add_argument("--config", help="TrainConfig as JSON; options override it")
    _add_dataclass_options(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-base", help="BAM's base learner: a PSPNet on the fold's base classes")
    p.add_argument("--config", help="BaseTrainConfig as JSON; options override it")
    _add_dataclass_options(p, BaseTrainConfig)
    p.set_defaults(func=cmd_train_base)

    p = sub.add_parser("convert-checkpoint", help="official PFENet / BAM / HSNet checkpoint -> diffss model folder")
    p.add_argument("checkpoint", help="the official .pth (a state dict or {'state_dict': ...}, 'module.' prefixes allowed)")
    p.add_argument("--from", dest="model", required=True, choices=("pfenet", "bam", "hsnet"), help="which official model")
    p.add_argument("--output", required=True, help="folder to write (config.json + model.safetensors)")
    p.add_argument("--base-learner", help="bam: the PSPNet best.pth of its base learner, merged with the checkpoint")
    p.add_argument("--shot", type=int, help="bam: total supports K (default: read from kshot_rw)")
    p.add_argument("--backbone", help="default: read from the weights")
    p.add_argument("--fold", type=int, help="bam: the official split, which names the base learner's classes")
    p.add_argument("--dataset", help="bam: pascal5i (default) or coco20i, with --fold")
    p.add_argument("--option", action="append", default=[], metavar="KEY=JSON", help="any other model argument, e.g. bins=[60,30,15,8]")
    p.set_defaults(func=cmd_convert_checkpoint)

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
    p.add_argument("--shard", default=None, help="i/n: only shard i (0-based) of n; n workers may share --output "
                   "(with several GPUs and no --device: cuda:<i mod count>, one worker per GPU)")
    p.add_argument("--controlnet", action="append", metavar="KIND=MODEL",
                   help="ControlNet of a condition kind: hub id or folder (e.g. one `diffss train-controlnet` wrote)")
    p.add_argument("--preset", choices=["paper"], default=None,
                   help="paper: ControlNet4FSS's generator settings (DDIM, ControlNet 1.0; see README)")
    _add_dataclass_options(p, GenerationConfig)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("tiny-models", help="write tiny random SD + ControlNet models (tests, demo, offline trials)")
    p.add_argument("--output", default="data/models/tiny-sd")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_models)

    p = sub.add_parser("train-controlnet", help="train a ControlNet on a frozen base model (images + masks + class names)")
    p.add_argument("--dataset", default="folder", help="pascal5i | coco20i | fss1000 | folder | demo")
    p.add_argument("--root", default=None, help="dataset root (see README for each layout)")
    p.add_argument("--fold", type=int, default=None)
    p.add_argument("--split", default=None, help="train (default: the fold's base classes) | test | all")
    p.add_argument("--condition", default="seg", help="seg | hed | scribble, or several joined by + (one ControlNet for all)")
    p.add_argument("--base-model", required=True, help="hub id or folder of a Stable Diffusion model")
    p.add_argument("--output", dest="output_dir", required=True, help="the ControlNet folder to write (resumable)")
    p.add_argument("--hed-model", default=None, help="HED weights: hub id, folder or 'random' (default lllyasviel/Annotators)")
    for flag, kind in (("--resolution", int), ("--steps", int), ("--batch-size", int),
                       ("--gradient-accumulation-steps", int), ("--learning-rate", float), ("--seed", int),
                       ("--checkpoint-every", int)):
        p.add_argument(flag, type=kind, default=None)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--local-files-only", action="store_true", default=None)
    p.set_defaults(func=cmd_train_controlnet)

    p = sub.add_parser("train-generator", help="train a complete small SD + ControlNet (the demo's generator)")
    p.add_argument("--preset", default="demo", help="demo: the demo world's pretraining pool and settings")
    p.add_argument("--output", default=None, help="where the float16 weights go (default: <work-dir>/weights)")
    p.add_argument("--replace-shipped", action="store_true",
                   help="write the weights shipped inside the package (maintainers refreshing them)")
    p.add_argument("--work-dir", default="data/generator/demo", help="pool, stage checkpoints (resumable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps (short trial runs)")
    p.add_argument("--pool-per-class", type=int, default=None, help="pool images per class (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="override every stage's batch size")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_train_generator)

    p = sub.add_parser("pretrain-backbone", help="pretrain the small backbone on the demo world's pool (its ImageNet)")
    p.add_argument("--preset", default="demo", help="demo: the demo world's pretraining pool")
    p.add_argument("--output", default=None, help="safetensors file (default: <work-dir>/small_demo.safetensors)")
    p.add_argument("--replace-shipped", action="store_true",
                   help="write the weights shipped inside the package (maintainers refreshing them)")
    p.add_argument("--work-dir", default="data/generator/demo", help="where the pool is rendered (shared with train-generator)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool-per-class", type=int, default=None, help="pool images per class (default: the generator's)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (resumable run "
                   "in <work-dir>/pretrain-backbone)")
    p.set_defaults(func=cmd_pretrain_backbone)

    p = sub.add_parser("demo-check", help="does the demo world need its supports? (K-shot and oracle vs 1-shot)")
    _study_options(p)
    p.add_argument("--real-shots", type=int, nargs="+", default=None, help="default 1 5")
    p.add_argument("--reference-spread", type=float, default=None, help="the spread to beat when one seed is run")
    p.set_defaults(func=cmd_demo_check)

    p = sub.add_parser("demo-study", help="with vs without auxiliary supports over training seeds (oracle + generator)")
    _study_options(p)
    p.add_argument("--conditions", nargs="*", default=["seg", "hed", "scribble"])
    p.add_argument("--no-oracle", action="store_true")
    p.add_argument("--generator", default=None, help="demo generator folder (default: the shipped weights)")
    p.add_argument("--generation-config", default=None, help="or any GenerationConfig JSON")
    p.add_argument("--num-aux", type=int, default=4)
    p.add_argument("--xshot", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--paper-aux-shot", type=int, default=4, help="1 real + N aux at training and test (0: skip)")
    p.set_defaults(func=cmd_demo_study)

    p = sub.add_parser("demo-data", help="build the procedural demo dataset (the only command that writes one)")
    p.add_argument("--root", default="data/raw/demo", help="an empty folder, or an earlier demo build")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-classes", type=int, default=20)
    p.add_argument("--per-class", type=int, default=12)
    p.set_defaults(func=cmd_demo_data)

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
