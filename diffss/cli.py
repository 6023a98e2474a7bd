"""The ``diffss`` command line: one subcommand per pipeline stage.

``diffss train`` / ``diffss evaluate`` / ``diffss train-base`` take every field of
:class:`~diffss.training.segmenter.TrainConfig` / :class:`~diffss.evaluation.evaluate.EvalConfig` /
:class:`~diffss.training.base_learner.BaseTrainConfig` as an option (``--true-shot 1 --aux-shot 4``) or a
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
            item = typing.get_args(base)[0] if typing.get_args(base) else int
            parser.add_argument(flag, type=item, nargs="+", default=None, help=f"default {field.default}")
        elif typing.get_origin(base) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(base), default=None, help=f"default {field.default}")
        elif base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"default {field.default}")
        else:
            parser.add_argument(flag, type=base, default=None, help=f"default {field.default}")


def _config_from_args(cls: type, args: argparse.Namespace):
    recipe = getattr(args, "recipe", None)  # the official recipe's values, under --config and the options
    values: dict[str, Any] = cls.from_recipe(recipe).to_dict() if recipe else {}
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
    parser.add_argument("--root", default=None, help="dataset root (docs/data.md gives each layout)")
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
    from diffss.training.segmenter import TrainConfig, train

    config = _config_from_args(TrainConfig, args)
    out = train(config, progress=not args.quiet)
    print(f"checkpoint: {out}")
    return 0


def cmd_train_base(args: argparse.Namespace) -> int:
    from diffss.training.base_learner import BaseTrainConfig, train_base

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
    from diffss.evaluation.evaluate import EvalConfig, evaluate

    config = _config_from_args(EvalConfig, args)  # evaluate refuses training classes unless allowed
    result = evaluate(args.checkpoint, config, progress=not args.quiet)
    protocol = result.protocol
    print(f"protocol {protocol['family']}: {protocol['resize']} to {protocol['size'] or 'the dataset size'} px, "
          f"scored at the {protocol['score_at']} size, seeds {list(protocol['seeds'])}")
    print(result.per_class.to_string(index=False))
    print(f"mIoU {result.miou:.2f}  FB-IoU {result.fbiou:.2f}")
    print(f"classes: {result.class_check}")
    if args.output:
        from diffss.core.atomic import atomic_path

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
    if args.ray is not None:
        return _generate_on_ray(args, samples, dataset, config)
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


def _generate_on_ray(args: argparse.Namespace, samples, dataset: str, config) -> int:
    from diffss.generation.ray_runner import generate_on_ray

    if args.shard is not None:
        raise ValueError("give --shard or --ray, not both (Ray splits the work itself)")
    result = generate_on_ray(samples, args.condition, args.output, config, num_aux=args.num_aux, dataset_name=dataset,
                             conditions_dir=_dataset_dir(args.conditions_dir, "data/conditions", args),
                             address=args.ray or None, workers=args.ray_workers,
                             cpus_per_worker=args.ray_cpus_per_worker, calls_per_unit=args.ray_calls_per_unit,
                             progress=not args.quiet)
    print(f"{len(result.paths)} auxiliary images under {result.folder} on Ray ({result.workers} workers, "
          f"{result.units} units, {result.nodes} nodes, {result.replaced_workers} replaced): {result.generated} generated, {result.kept} kept, "
          f"{result.images_per_second:.3f} images/s; table {result.table_path} has {len(result.table)} rows")
    return 0


def cmd_tiny_models(args: argparse.Namespace) -> int:
    from diffss.generation import build_tiny_diffusion

    config = build_tiny_diffusion(args.output, seed=args.seed)
    config_path = Path(args.output) / "generation_config.json"
    config.to_json(config_path)
    print(f"tiny random SD + ControlNet under {args.output}; use it with --generation-config {config_path}")
    return 0


def cmd_train_controlnet(args: argparse.Namespace) -> int:
    from diffss.generation.generator_training import GeneratorTrainConfig, train_generator

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
    from diffss.generation.demo_generator import (DEMO_PRESET, PRETRAINED_DIR, at_resolution, refine_generator,
                                                  train_demo_generator)

    if args.preset != "demo":
        raise ValueError(f"unknown --preset {args.preset!r}; known: demo")
    preset = DEMO_PRESET if args.resolution is None else at_resolution(DEMO_PRESET, args.resolution)
    output = _outside_package(args.output or Path(args.work_dir) / "weights", args.replace_shipped, PRETRAINED_DIR)
    refine = [(stage, value) for stage, value in (("decoder", args.decoder_of), ("class-binding", args.class_binding_of))
              if value]
    if len(refine) > 1:
        raise ValueError("give one of --decoder-of and --class-binding-of (run them one after the other)")
    if refine:
        stage, value = refine[0]
        source = PRETRAINED_DIR if value == "shipped" else Path(value)
        if not (source / "sd" / "vae" / "config.json").is_file() or not (source / "controlnet" / "config.json").is_file():
            raise ValueError(f"--{stage}-of {value}: {source} is not a generator folder "
                             "(no sd/vae/config.json and controlnet/config.json)")
        config = refine_generator(source, output, stage, work_dir=args.work_dir, seed=args.seed,
                                  steps_scale=args.steps_scale, batch_size=args.batch_size, preset=preset,
                                  device=args.device, progress=not args.quiet, pool_per_class=args.pool_per_class)
    else:
        config = train_demo_generator(output_dir=output, work_dir=args.work_dir, seed=args.seed,
                                      steps_scale=args.steps_scale, pool_per_class=args.pool_per_class,
                                      batch_size=args.batch_size, preset=preset, device=args.device,
                                      progress=not args.quiet)
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
                                      checkpoint_every=args.checkpoint_every, supervision=args.supervision)
    print(json.dumps({**summary, "output": str(output)}, indent=2))
    return 0


def _study_config(args: argparse.Namespace):
    from diffss.experiment.studies import StudyConfig

    values = {k: getattr(args, k) for k in ("root", "output_dir", "fold", "seeds", "steps", "image_size", "batch_size",
                                            "episodes", "device", "pretrained") if getattr(args, k, None) is not None}
    for name in ("xshot", "paper_aux_shot", "train_aux_shot", "eval_aux_shot", "real_shots", "aux_draw"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    return StudyConfig(**values)


def cmd_demo_check(args: argparse.Namespace) -> int:
    from diffss.experiment.studies import support_check

    verdict = support_check(_study_config(args), reference_spread=args.reference_spread, progress=not args.quiet)
    print(json.dumps(verdict, indent=2))
    return 0 if verdict["passed"] else 1


def cmd_demo_study(args: argparse.Namespace) -> int:
    from diffss.generation import GenerationConfig
    from diffss.generation.demo_generator import demo_generation_config
    from diffss.experiment.studies import demo_study, strength_sweep, summary_markdown

    cfg = _study_config(args)
    if args.base_validation:  # the fold's base classes only: the fold's novel classes are never tested
        from diffss.data.demo import base_class_root

        validation_root = base_class_root(cfg.root, cfg.fold, Path(cfg.output_dir) / "base-classes")
        cfg = dataclasses.replace(cfg, root=str(validation_root), fold=args.validation_fold)
    elif args.validation_fold:
        raise SystemExit("--validation-fold chooses which base classes --base-validation tests: give --base-validation")
    if args.strength_sweep and not args.conditions:
        raise SystemExit("--strength-sweep paints with the generator: name at least one of --conditions")
    device = None if cfg.device == "auto" else cfg.device
    generation = (GenerationConfig.from_json(args.generation_config) if args.generation_config
                  else demo_generation_config(args.generator, device=device)) \
        if args.conditions or args.oracle_autoencoded else None
    summary = demo_study(cfg, generation, conditions=args.conditions, oracle=not args.no_oracle,
                         num_aux=args.num_aux, progress=not args.quiet, oracle_autoencoded=args.oracle_autoencoded)
    print(summary_markdown(summary))
    print(f"results: {cfg.output_dir}/results.csv, summary.csv, summary.md, auxiliary_grid.png")
    if args.strength_sweep:
        sweep = strength_sweep(cfg, generation, args.strength_sweep, args.conditions, progress=not args.quiet)
        print(sweep.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        print(f"gain against strength: {cfg.output_dir}/gain_vs_strength.csv, gain_vs_strength.png")
    return 0


def cmd_generator_probe(args: argparse.Namespace) -> int:
    """Strength x steps x guidance sweep of a demo generator on a fold's base-class supports (never its novel
    classes): own / other-class contrast, appearance and pixel difference to the support."""
    import dataclasses
    import itertools

    import pandas as pd

    from diffss.core.atomic import atomic_path
    from diffss.generation import AuxiliaryGenerator
    from diffss.generation.demo_generator import base_supports, class_following, demo_generation_config

    base = demo_generation_config(args.generator, device=args.device, **({"start": args.start} if args.start else {}))
    samples = base_supports(args.root, fold=args.fold, count=args.supports)
    rows = []
    for kind in args.conditions:
        generator = AuxiliaryGenerator(base, kind)
        for steps, guidance, strength in itertools.product(args.steps, args.guidance or [base.guidance_scale],
                                                           args.strengths):
            cfg = dataclasses.replace(base, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                                      object_strength=args.object_strength)
            generator.config = cfg
            scores = class_following(cfg, samples, Path(args.output) / "conditions", kind, generator=generator,
                                     candidates=args.candidates)
            rows.append({"condition": kind, "start": cfg.start, "steps": steps, "guidance": guidance,
                         "strength": strength, "object_strength": args.object_strength, "candidates": args.candidates,
                         **scores})
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    with atomic_path(Path(args.output) / "generator_probe.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    print(f"table: {Path(args.output) / 'generator_probe.csv'}")
    return 0


def _study_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="demo dataset root (FSS-1000 layout)")
    p.add_argument("--output", dest="output_dir", required=True, help="checkpoints, evaluations, tables (resumable)")
    p.add_argument("--fold", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2 3)")
    for flag in ("--steps", "--image-size", "--batch-size", "--episodes"):
        p.add_argument(flag, type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--pretrained", default=None, help="small-backbone weights (default: demo, the shipped file)")


def cmd_demo_data(args: argparse.Namespace) -> int:
    from diffss.data import build_demo_dataset

    root = build_demo_dataset(args.root, seed=args.seed, num_classes=args.num_classes, per_class=args.per_class)
    print(f"demo dataset under {root} (use --dataset demo --root {root})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from diffss.export import export_model_repository
    from diffss.export.quantize import AccuracyGuardError, quantize_data

    data = None
    if args.quantize:
        # calibration and guard episodes: the checkpoint's own training data unless named
        trained = Path(args.checkpoint) / "train_config.json"
        saved = json.loads(trained.read_text()) if trained.is_file() else {}
        dataset, root = args.dataset or saved.get("dataset"), args.root or saved.get("root")
        if not dataset:
            raise ValueError(f"--quantize needs episodes: {trained} is missing, so name --dataset (and --root)")
        fold = args.fold if args.fold is not None else saved.get("fold", 0)
        size = args.image_size or saved.get("image_size")
        data = quantize_data(dataset, root, fold, size, shots=saved.get("true_shot", 1),
                             calibration_episodes=args.calibration_episodes, guard_episodes=args.guard_episodes)
    try:
        info = export_model_repository(args.checkpoint, args.output, name=args.name, image_size=args.image_size,
                                       quantize=args.quantize, quantize_data=data, max_miou_drop=args.max_miou_drop)
    except AccuracyGuardError as exc:
        print(f"diffss export: {exc}", file=sys.stderr)
        return 3
    print(json.dumps(info, indent=2, default=str))
    return 0


# -- real data: `datasets prepare | check`, `reproduce` (docs/real-data.md) ------------------------

def cmd_datasets_prepare(args: argparse.Namespace) -> int:
    from diffss.data.prepare import prepare_pascal5i

    if args.dataset != "pascal5i":
        print(f"{args.dataset}: nothing to prepare; the loader reads the official download as it is "
              f"(see docs/real-data.md); check it with `diffss datasets check {args.dataset} --root ...`")
        return 0
    if not args.voc:
        raise ValueError("prepare pascal5i needs --voc <VOCdevkit/VOC2012> (and --sbd <benchmark_RELEASE/dataset>)")
    report = prepare_pascal5i(args.voc, args.sbd, args.output, overwrite=args.overwrite, progress=not args.quiet)
    print("\n".join(report.lines()))
    return 1 if report.bad else 0


def cmd_datasets_check(args: argparse.Namespace) -> int:
    from diffss.data.check import check_dataset

    if args.class_split and args.dataset != "coco20i":
        raise ValueError("--class-split is a coco20i option")
    options = {"class_split": args.class_split} if args.class_split else {}
    report = check_dataset(args.dataset, args.root, mode=args.mode, per_class=args.per_class, folds=args.folds,
                           progress=not args.quiet, **options)
    print("\n".join(report.lines(limit=args.limit or None)))
    return 0 if report.passed(strict=args.strict) else 1


def _add_real_data_commands(sub) -> None:
    datasets = sub.add_parser("datasets", help="build and check the benchmark layouts from the official downloads")
    dsub = datasets.add_subparsers(dest="datasets_command", required=True)
    p = dsub.add_parser("prepare", help="pascal5i: SegmentationClassAug from VOC2012 + SBD (resumable)")
    p.add_argument("dataset", choices=["pascal5i", "coco20i", "fss1000"])
    p.add_argument("--voc", help="VOCdevkit/VOC2012 (JPEGImages/, SegmentationClass/)")
    p.add_argument("--sbd", help="SBD's benchmark_RELEASE/dataset (cls/*.mat)")
    p.add_argument("--output", help="default <voc>/SegmentationClassAug, where the loader reads")
    p.add_argument("--overwrite", action="store_true", help="rewrite masks that exist (default: keep them, resume)")
    p.set_defaults(func=cmd_datasets_prepare)
    p = dsub.add_parser("check", help="layout, pairing, mask values, class presence, published counts (read-only)")
    p.add_argument("dataset", choices=["pascal5i", "coco20i", "fss1000", "folder", "demo"])
    p.add_argument("--root", required=True)
    p.add_argument("--mode", choices=["sample", "full"], default="sample",
                   help="sample: pixels of --per-class samples of each class; full: every sample")
    p.add_argument("--per-class", type=int, default=5)
    p.add_argument("--folds", type=int, nargs="+", default=None, help="default: every fold")
    p.add_argument("--class-split", default=None, help="coco20i: interleaved (default) | consecutive")
    p.add_argument("--limit", type=int, default=20, help="lines per kind of problem (0: all)")
    p.add_argument("--strict", action="store_true", help="warnings (counts unlike the published ones) fail too")
    p.set_defaults(func=cmd_datasets_check)


def _fold_map(items: list[str] | None, flag: str, with_shot: bool = False) -> dict:
    """``FOLD=VALUE`` (or, ``with_shot``, ``FOLD:SHOT=VALUE``) options -> {fold: value} / {(fold, shot): value}."""
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        fold, colon, shot = key.partition(":")
        if not sep or not value or not fold.isdigit() or (colon and not (with_shot and shot.isdigit())):
            form = "FOLD=PATH or FOLD:SHOT=PATH" if with_shot else "FOLD=PATH"
            raise ValueError(f"{flag} expects {form}, got {item!r}")
        out[(int(fold), int(shot)) if colon else int(fold)] = value
    return out


def cmd_reproduce(args: argparse.Namespace) -> int:
    from diffss.evaluation.reproduce import ReproduceConfig, reproduce

    given = _fold_map(args.checkpoint, "--checkpoint", with_shot=True)
    checkpoints = {k: v for k, v in given.items() if isinstance(k, int)}
    per_shot = {k: v for k, v in given.items() if isinstance(k, tuple)}
    for fold, shot in per_shot:
        checkpoints.setdefault(fold, per_shot[(fold, shot)])
    cfg = ReproduceConfig(dataset=args.dataset, root=args.root, checkpoints=checkpoints, output_dir=args.output,
                          shots=tuple(args.shots), shot_checkpoints=per_shot,
                          aux_checkpoints=_fold_map(args.aux_checkpoint, "--aux-checkpoint"),
                          auxiliary=_fold_map(args.auxiliary, "--auxiliary"), condition=args.condition,
                          aux_shot=args.aux_shot, episodes=args.episodes,
                          seeds=tuple(args.seeds) if args.seeds else None, image_size=args.image_size,
                          batch_size=args.batch_size, device=args.device,
                          allow_trained_classes=args.allow_trained_classes, bootstrap=args.bootstrap)
    out = reproduce(cfg, progress=not args.quiet, log=None if args.quiet else print)
    print(out["markdown"])
    print(f"tables: {Path(args.output) / 'table.md'}, table.csv, results.csv (per fold and setting, with spreads)")
    return 0


def cmd_publish_model(args: argparse.Namespace) -> int:
    from diffss.evaluation.hub import HubSegmenter

    model = HubSegmenter.from_checkpoint(args.checkpoint, evaluation=args.evaluation, data_version=args.data_version)
    model.save_pretrained(args.output)
    print(f"segmenter folder with model card: {args.output} (HubSegmenter.from_pretrained({str(args.output)!r}))")
    if args.push_to:
        print(f"pushed: {model.push_to_hub(args.push_to, private=args.private)}")
    return 0


def _add_reproduce_commands(sub) -> None:
    p = sub.add_parser("reproduce", help="the paper's table (folds, mean; mIoU, FB-IoU) with spreads and published numbers")
    p.add_argument("--dataset", required=True, help="pascal5i | coco20i | fss1000 | demo | folder")
    p.add_argument("--root", default=None)
    p.add_argument("--checkpoint", action="append", required=True, metavar="FOLD[:SHOT]=DIR",
                   help="a fold's checkpoint folder or hub id (FOLD:SHOT=...: for that shot only); repeat per fold")
    p.add_argument("--aux-checkpoint", action="append", metavar="FOLD=DIR", help="for the rows with auxiliary supports")
    p.add_argument("--auxiliary", action="append", metavar="FOLD=TABLE", help="a fold's auxiliary generation table")
    p.add_argument("--condition", default=None, help="the auxiliary table's condition (seg | hed | scribble)")
    p.add_argument("--aux-shot", type=int, default=None, help="auxiliary images per episode (default: as trained, else 1)")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--output", required=True, help="cells (resumable), results.csv, table.csv, table.md")
    p.add_argument("--episodes", type=int, default=None, help="override the protocol (the table says so)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the protocol (the table says so)")
    p.add_argument("--image-size", type=int, default=None, help="override the protocol (the table says so)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% interval over episodes")
    p.add_argument("--allow-trained-classes", action="store_true",
                   help="score a checkpoint on classes it trained on (the table says so)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("publish-model", help="a checkpoint as a hub-ready folder with its model card (optionally pushed)")
    p.add_argument("checkpoint")
    p.add_argument("--output", required=True)
    p.add_argument("--evaluation", default=None, help="Markdown evaluation table (e.g. reproduce's table.md)")
    p.add_argument("--data-version", default=None, help="DVC hash of the data (default: data.dvc here, if any)")
    p.add_argument("--push-to", default=None, metavar="ORG/NAME", help="push to the Hugging Face Hub (network, token)")
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=cmd_publish_model)


def build_parser() -> argparse.ArgumentParser:
    from diffss.generation import GenerationConfig
    from diffss.evaluation.evaluate import EvalConfig
    from diffss.training.segmenter import TrainConfig
    from diffss.training.base_learner import BaseTrainConfig
    from diffss.training.recipes import RECIPES

    parser = argparse.ArgumentParser(prog="diffss", description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="episodic training of a few-shot segmenter")
    p.add_argument("--config", help="TrainConfig as JSON; options override it")
    p.add_argument("--recipe", choices=sorted(k for k, r in RECIPES.items() if r.model != "pspnet"),
                   help="start from an official recipe (docs/training.md); "
                   "--config and the options override it")
    _add_dataclass_options(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-base", help="BAM's base learner: a PSPNet on the fold's base classes")
    p.add_argument("--config", help="BaseTrainConfig as JSON; options override it")
    p.add_argument("--recipe", choices=sorted(k for k, r in RECIPES.items() if r.model == "pspnet"),
                   help="start from BAM's official base-learner recipe; --config and the options override it")
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
    p.add_argument("--allow-trained-classes", action="store_true",
                   help="score the checkpoint on classes it trained on (refused by default; the output says so)")
    _add_dataclass_options(p, EvalConfig, skip=("allow_trained_classes",))
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
                   help="paper: ControlNet4FSS's generator settings (DDIM, ControlNet 1.0; docs/generation.md lists what differs)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="paint on a Ray cluster (pip install 'diffss[ray]'): no ADDRESS starts a local one, 'auto' "
                   "joins this machine's cluster, else host:port or ray://host:10001; --output must be shared by all nodes")
    p.add_argument("--ray-workers", type=int, default=None,
                   help="Ray workers (default: one per GPU of the cluster, else one per --ray-cpus-per-worker CPUs)")
    p.add_argument("--ray-cpus-per-worker", type=float, default=1, help="CPUs (and torch threads on CPU) per Ray worker")
    p.add_argument("--ray-calls-per-unit", type=int, default=4,
                   help="pipeline calls per unit of work (a unit is what a lost worker redoes and what progress counts)")
    _add_dataclass_options(p, GenerationConfig)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("tiny-models", help="write tiny random SD + ControlNet models (tests, benchmarks, offline trials; they paint noise)")
    p.add_argument("--output", default="data/models/tiny-sd")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_models)

    p = sub.add_parser("train-controlnet", help="train a ControlNet on a frozen base model (images + masks + class names)")
    p.add_argument("--dataset", default="folder", help="pascal5i | coco20i | fss1000 | folder | demo")
    p.add_argument("--root", default=None, help="dataset root (docs/data.md gives each layout)")
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
    p.add_argument("--resolution", type=int, default=None,
                   help="train and paint at this many px instead of the preset's (64); with --class-binding-of, "
                        "takes a generator's weights to the new size")
    p.add_argument("--device", default="auto")
    p.add_argument("--decoder-of", default=None, metavar="GENERATOR",
                   help="only the decoder stage, on this generator folder's autoencoder ('shipped': the package's); "
                        "writes the generator with the new decoder (its UNet and ControlNet unchanged)")
    p.add_argument("--class-binding-of", default=None, metavar="GENERATOR",
                   help="only the class-binding stage, on this generator folder ('shipped': the package's): its "
                        "text encoder, UNet and ControlNet trained on together; writes the bound generator")
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
    p.add_argument("--supervision", choices=["image", "mask"], default="image",
                   help="image: class labels only, as ImageNet (default); mask: how the shipped file was made")
    p.set_defaults(func=cmd_pretrain_backbone)

    p = sub.add_parser("demo-check", help="does the demo world need its supports? (K-shot and oracle vs 1-shot)")
    _study_options(p)
    p.add_argument("--oracle-autoencoded", action="store_true",
                   help="add the oracle's images through the generator's autoencoder (what the autoencoder alone costs)")
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
    p.add_argument("--aux-draw", choices=("first", "random"), default=None,
                   help="which of a training support's aux images an episode shows: its best-ranked first, or a "
                        "fresh random draw among all of them per episode (default: first)")
    p.add_argument("--oracle-autoencoded", action="store_true",
                   help="add the oracle's images through the generator's autoencoder (what the autoencoder alone costs)")
    p.add_argument("--real-shots", type=int, nargs="+", default=None,
                   help="real shots the baseline is tested with (default 1 5; 1 alone for a fold with small classes)")
    p.add_argument("--strength-sweep", type=float, nargs="+", default=None, metavar="S",
                   help="also: gain over the baseline against support-guidance strength S (e.g. 0.25 0.5 0.75 1), "
                        "1 real + 1 aux per condition -> gain_vs_strength.csv/.png")
    p.add_argument("--base-validation", action="store_true",
                   help="run on the fold's base classes only (a validation split: its first group of base classes "
                        "tested, the others trained on), to choose settings without the fold's novel classes")
    p.add_argument("--validation-fold", type=int, default=0,
                   help="with --base-validation: which group of the base classes is tested (0: the first; a "
                        "20-class demo has groups 0-3, of 4, 4, 4 and 3 classes): a second group checks a choice")
    p.set_defaults(func=cmd_demo_study)

    p = sub.add_parser("generator-probe", help="strength x steps sweep of the demo generator on base-class supports")
    p.add_argument("--root", required=True, help="demo dataset root")
    p.add_argument("--output", required=True, help="folder for conditions and generator_probe.csv")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--supports", type=int, default=30, help="base-class supports, spread over the classes")
    p.add_argument("--conditions", nargs="+", default=["seg"])
    p.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.85, 0.9, 1.0])
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--guidance", type=float, nargs="+", default=None, help="default: the generator's")
    p.add_argument("--start", choices=["support", "new_scene"], default=None, help="default: the generator's")
    p.add_argument("--candidates", type=int, default=1,
                   help="paint N per support and score the best by appearance (keep-best generation)")
    p.add_argument("--object-strength", type=float, default=None,
                   help="hold the object to the support until this level (GenerationConfig.object_strength)")
    p.add_argument("--generator", default=None, help="demo generator folder (default: the shipped weights)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_generator_probe)

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
    p.add_argument("--image-size", type=int, default=None, help="working size (default: the model config's, else 473)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="serve int8 graphs (onnxruntime static quantisation), refused if mIoU drops too much")
    p.add_argument("--max-miou-drop", type=float, default=0.5, help="int8 accuracy guard, mIoU points (default %(default)s)")
    p.add_argument("--dataset", default=None, help="episodes for calibration/guard (default: the checkpoint's train_config.json)")
    p.add_argument("--root", default=None)
    p.add_argument("--fold", type=int, default=None)
    p.add_argument("--calibration-episodes", type=int, default=32, help="training episodes for activation ranges")
    p.add_argument("--guard-episodes", type=int, default=100, help="test episodes both models are scored on")
    p.set_defaults(func=cmd_export)
    _add_real_data_commands(sub)
    _add_reproduce_commands(sub)
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
