"""int8 graphs for CPU serving, with an accuracy guard.

``quantize_int8`` turns the three fp32 graphs of an exported family into int8 ones with
onnxruntime's quantisation tools: static quantisation (QDQ format, int8 weights per channel,
uint8 activations whose ranges come from a calibration set of training episodes) of the
convolutions, which is where a backbone's CPU time goes; a graph that
static quantisation cannot handle falls back to dynamic quantisation (weights only, ranges
computed per run), and the record says which was used.

The guard: the fp32 and the int8 segmenter graphs are evaluated on the same test episodes
(mIoU at the input size, as :class:`diffss.evaluation.metrics.FewShotMeter` computes it), and when the
int8 mIoU is more than ``max_miou_drop`` points below, :class:`AccuracyGuardError` says so and
the caller writes nothing (``export_model_repository(..., quantize="int8")`` stages the whole
export outside the repository and moves it in only when the guard passes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnxruntime as ort

from diffss.export.parity import cpu_session
from diffss.export.triton import find_model_file
from serving_contract import LOGITS, QUERY, SUPPORT_IMAGES, SUPPORT_MASKS, model_dir_name

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("int8",)
DEFAULT_MAX_MIOU_DROP = 0.5  # mIoU points
DEFAULT_CALIBRATION_EPISODES = 32
DEFAULT_GUARD_EPISODES = 100
# Convolutions only: they are most of a backbone's time and run 2-3x faster as int8 (QLinearConv).
# The prior's MatMul makes a [query pixels, support pixels] similarity whose int8 result would
# have to be dequantised again (measured: no faster, and the dequantisation cost more).
QUANTIZED_OPS = ("Conv",)


class AccuracyGuardError(RuntimeError):
    """The int8 model loses more mIoU than allowed; nothing was written."""


@dataclass
class Episode:
    """One episode as the graphs take it (batch 1) and its label at the input size."""

    feeds: dict[str, np.ndarray]
    label: np.ndarray  # [H, W] in {0, 1, 255}
    class_id: int


def load_episodes(
    dataset: str, root: str | os.PathLike | None, fold: int | None, split: str, count: int, image_size: int,
    shots: int = 1, seed: int = 0,
) -> tuple[list[Episode], list[int]]:
    """``count`` episodes of ``split`` (train: calibration, test: the guard) and the split's class ids."""
    from diffss.data import load_dataset

    episodes = load_dataset(dataset, root=root, fold=fold, split=split, shot=shots, episodes=count, seed=seed,
                            image_size=image_size)
    out = []
    for index in range(min(count, len(episodes))):
        item = episodes[index]
        out.append(Episode(
            {QUERY: item["query_image"][None].numpy(), SUPPORT_IMAGES: item["support_images"][None].numpy(),
             SUPPORT_MASKS: item["support_masks"][None].numpy().astype(np.int64)},
            item["query_mask"].numpy(), int(item["class_id"]),
        ))
    if not out:
        raise ValueError(f"{dataset} fold {fold} {split}: no episodes to draw")
    return out, list(episodes.class_ids)


@dataclass
class QuantizeData:
    """Episodes for ``quantize="int8"``: ``calibration`` (training episodes, activation ranges),
    ``guard`` (test episodes both models are scored on), the test split's ``class_ids``, and
    ``source`` (dataset, fold, ... recorded with the numbers)."""

    calibration: Sequence[Episode]
    guard: Sequence[Episode]
    class_ids: Sequence[int]
    source: dict = field(default_factory=dict)


def quantize_data(
    dataset: str, root: str | os.PathLike | None, fold: int | None, image_size: int, shots: int = 1,
    calibration_episodes: int = DEFAULT_CALIBRATION_EPISODES, guard_episodes: int = DEFAULT_GUARD_EPISODES,
    seed: int = 0,
) -> QuantizeData:
    """Calibration episodes from the training split, guard episodes from the test split, of
    one dataset and fold at the graphs' working size."""
    calibration, _ = load_episodes(dataset, root, fold, "train", calibration_episodes, image_size, shots, seed)
    guard, class_ids = load_episodes(dataset, root, fold, "test", guard_episodes, image_size, shots, seed)
    return QuantizeData(calibration, guard, class_ids,
                        {"dataset": dataset, "fold": fold, "image_size": image_size, "shots": shots, "seed": seed})


class _Feeds:
    """onnxruntime's CalibrationDataReader over a list of feeds (duck-typed: ``get_next``)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self._items = iter(feeds)

    def get_next(self):
        return next(self._items, None)

    def rewind(self):  # pragma: no cover - used by some calibrators
        pass


def _graph_feeds(role: str, episodes: Sequence[Episode], encoder_path: Path) -> list[dict[str, np.ndarray]]:
    """Calibration inputs of one graph: the decoder's support features come from the fp32 encoder."""
    if role == "segmenter":
        return [e.feeds for e in episodes]
    supports = [{SUPPORT_IMAGES: e.feeds[SUPPORT_IMAGES], SUPPORT_MASKS: e.feeds[SUPPORT_MASKS]} for e in episodes]
    if role == "support_encoder":
        return supports
    encoder = cpu_session(encoder_path)
    names = [o.name for o in encoder.get_outputs()]
    return [{QUERY: e.feeds[QUERY], **dict(zip(names, encoder.run(names, s)))} for e, s in zip(episodes, supports)]


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime's quantiser warns on the root logger for every bias it leaves in float and
    suggests its pre-processing on every call; neither changes the result, which the guard checks."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def weights_as_initializers(proto) -> int:
    """Make every constant a graph initializer, in place; returns how many nodes went.

    The TorchScript exporter hands weights shared by two paths (the backbone runs on the query
    and on the supports) through ``Identity`` nodes, and some constants through ``Constant``
    nodes. onnxruntime's quantiser only quantises a Conv whose weight and bias are initializers:
    it would leave those in float between dequantise/quantise pairs, slower than fp32."""
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] not in outputs and len(node.attribute) == 1 \
                and node.attribute[0].name == "value":
            tensor = numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t), node.output[0])
            graph.initializer.append(tensor)
            initializers.add(node.output[0])
            continue
        source = rename.get(node.input[0], node.input[0]) if node.input else None
        if node.op_type == "Identity" and source in initializers and node.output[0] not in outputs:
            rename[node.output[0]] = source
            continue
        kept.append(node)
    for node in kept:
        for index, name in enumerate(node.input):
            if name in rename:
                node.input[index] = rename[name]
    removed = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(kept)
    return removed


def quantize_graph(fp32_path: Path, int8_path: Path, calibration: Sequence[dict[str, np.ndarray]]) -> str:
    """Write the int8 graph of ``fp32_path`` to ``int8_path``; returns "static" or "dynamic"."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    with tempfile.TemporaryDirectory(prefix="diffss-quantize-") as tmp, _quiet_root_logger():
        staged = Path(tmp) / "model.onnx"
        prepared = Path(tmp) / "prepared.onnx"
        proto = onnx.load(str(fp32_path))
        weights_as_initializers(proto)
        onnx.save(proto, str(prepared))
        try:
            quantize_static(
                str(prepared), str(staged), _Feeds(calibration),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                per_channel=True, op_types_to_quantize=list(QUANTIZED_OPS),
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
            mode = "static"
        except Exception as exc:  # noqa: BLE001 - any failure of the static path: the dynamic one
            log.warning("%s: static quantisation failed (%s: %s); dynamic quantisation instead",
                        fp32_path, type(exc).__name__, exc)
            quantize_dynamic(str(prepared), str(staged), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"])
            mode = "dynamic"
        proto = onnx.load(str(staged))
        source = onnx.load(str(fp32_path), load_external_data=False)
        del proto.metadata_props[:]  # the serving contract's metadata, as the fp32 graph has it
        proto.metadata_props.extend(source.metadata_props)
        entry = proto.metadata_props.add()
        entry.key, entry.value = "diffss.quantization", f"int8-{mode}"
        int8_path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, str(int8_path))
    return mode


def onnx_miou(segmenter: ort.InferenceSession, episodes: Iterable[Episode], class_ids: Sequence[int]) -> float:
    """mIoU (percent) of a segmenter graph on ``episodes``, scored at the input size."""
    from diffss.evaluation.metrics import FewShotMeter

    meter = FewShotMeter(class_ids)
    for episode in episodes:
        logits = segmenter.run([LOGITS], episode.feeds)[0]
        meter.update(logits[0].argmax(0), episode.label, episode.class_id)
    return float(meter.compute()["miou"])


def quantize_int8(
    fp32_repo: str | os.PathLike, int8_repo: str | os.PathLike, name: str,
    calibration: Sequence[Episode], guard: Sequence[Episode], class_ids: Sequence[int],
    max_miou_drop: float = DEFAULT_MAX_MIOU_DROP,
) -> dict:
    """Quantise the three graphs of family ``name`` from ``fp32_repo`` into ``int8_repo`` (same
    layout, config.pbtxt copied) and check the guard; returns the record (``fp32_miou``,
    ``int8_miou``, ``miou_drop``, ``max_miou_drop``, ``modes``, episode counts). Raises
    :class:`AccuracyGuardError` when the drop exceeds ``max_miou_drop`` (``int8_repo`` is then
    the caller's to discard)."""
    if max_miou_drop < 0:
        raise ValueError(f"max_miou_drop must be >= 0 points, got {max_miou_drop}")
    fp32_repo, int8_repo = Path(fp32_repo), Path(int8_repo)
    encoder = find_model_file(fp32_repo / model_dir_name(name, "support_encoder"))
    modes = {}
    for role in ("segmenter", "support_encoder", "query_decoder"):
        source_dir = fp32_repo / model_dir_name(name, role)
        fp32_path = find_model_file(source_dir)
        target_dir = int8_repo / source_dir.name
        int8_path = target_dir / fp32_path.parent.name / fp32_path.name
        modes[role] = quantize_graph(fp32_path, int8_path, _graph_feeds(role, calibration, encoder))
        for extra in source_dir.iterdir():
            if extra.is_file():  # config.pbtxt
                shutil.copy2(extra, target_dir / extra.name)
    fp32_miou = onnx_miou(cpu_session(find_model_file(fp32_repo / model_dir_name(name, "segmenter"))), guard, class_ids)
    int8_miou = onnx_miou(cpu_session(find_model_file(int8_repo / model_dir_name(name, "segmenter"))), guard, class_ids)
    record = {
        "dtype": "int8",
        "modes": modes,
        "fp32_miou": fp32_miou,
        "int8_miou": int8_miou,
        "miou_drop": fp32_miou - int8_miou,
        "max_miou_drop": float(max_miou_drop),
        "calibration_episodes": len(calibration),
        "guard_episodes": len(guard),
        "versions": {"onnxruntime": ort.__version__},
    }
    if record["miou_drop"] > max_miou_drop:
        raise AccuracyGuardError(
            f"int8 export of {name!r} refused: mIoU {int8_miou:.2f} against fp32 {fp32_miou:.2f} on the same "
            f"{len(guard)} test episodes, a drop of {record['miou_drop']:.2f} points, over the limit of "
            f"{max_miou_drop:.2f} (--max-miou-drop); nothing was written. Export fp32, or allow a larger drop."
        )
    return record
