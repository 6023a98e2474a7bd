"""The contract between an exported diffss model repository and its servers, in one place.

``diffss.export`` writes repositories to it and ``diffss-serve`` (``deploy/``) reads them: the
Triton layout, the graph roles and tensor names, the named dynamic axes, the ONNX metadata keys,
the dynamic-batching defaults and one table of tensor datatypes in the spellings of ONNX,
onnxruntime, Triton and the Open Inference Protocol.

A package of its own, beside ``diffss`` and ``deploy``, so that neither imports the other:
the library must not import the server, and the server must not import the library (torch).
Standard library only: it imports neither torch, diffss nor deploy, and the serving image
(deploy/Dockerfile) ships it with ``deploy/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# -- Triton layout: <repo>/<name>_<role>/config.pbtxt and <repo>/<name>_<role>/<version>/model.onnx
MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"
GRAPH_ROLES = ("segmenter", "support_encoder", "query_decoder")


def model_dir_name(name: str, role: str) -> str:
    """``diffss`` + ``support_encoder`` -> ``diffss_support_encoder``."""
    return f"{name}_{role}"


def latest_version(model_dir: str | os.PathLike) -> str | None:
    """The highest numeric ``<version>`` folder holding a model file (Triton's default policy)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return None
    versions = [p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and (p / MODEL_FILE).is_file()]
    return max(versions, key=int) if versions else None


# -- tensors of the three graphs (support features are model specific and listed in metadata)
QUERY = "query"  # FP32 [batch, 3, height, width], RGB in [0, 1]
SUPPORT_IMAGES = "support_images"  # FP32 [batch, shots, 3, support_height, support_width]
SUPPORT_MASKS = "support_masks"  # INT64 [batch, shots, support_height, support_width]: 1 fg, 0 bg, 255 ignore
LOGITS = "logits"  # FP32 [batch, 2, height, width]
FEATURE_PREFIX = "support_feat_"  # names of support features a model does not name itself

# named dynamic axes: the same name binds the same length across a graph's tensors
BATCH, SHOTS = "batch", "shots"
QUERY_AXES = {0: BATCH, 2: "height", 3: "width"}
# Supports may have another size than the query: their spatial axes have names of their own.
SUPPORT_IMAGE_AXES = {0: BATCH, 1: SHOTS, 3: "support_height", 4: "support_width"}
SUPPORT_MASK_AXES = {0: BATCH, 1: SHOTS, 2: "support_height", 3: "support_width"}
SPATIAL_AXES = frozenset({"height", "width", "support_height", "support_width"})

# -- ONNX metadata_props of every exported graph
ROLE_KEY = "diffss.role"  # one of GRAPH_ROLES
FAMILY_KEY = "diffss.family"  # the export name shared by the three graphs
IMAGE_SIZE_KEY = "diffss.image_size"  # side the people's routes resize PNG/JPEG inputs to
MAX_INPUT_SIDE_KEY = "diffss.max_input_side"  # largest height/width the graphs are served at
MODEL_CONFIG_KEY = "diffss.model_config"  # JSON of the model's config
SUPPORT_FEATURES_KEY = "diffss.support_features"  # JSON list of the support feature names
# query_decoder only: JSON {input: vector axis} of the support features it reads only as sets
# of vectors (FewShotSegmenter.set_valued_support_features); servers may compact those.
SET_VALUED_KEY = "diffss.set_valued_inputs"

# The usual few-shot segmentation resolution (PASCAL-5i / COCO-20i protocols).
DEFAULT_IMAGE_SIZE = 473

# -- dynamic batching (Triton's names): requests for one graph that arrive within
# max_queue_delay of each other run as one batch of at most max_batch_size rows; at most
# max_queue_size requests wait. diffss-serve's defaults, and what the exporter writes into each
# config.pbtxt's dynamic_batching block so Triton batches the same way. A batch's memory grows
# with its rows (PFENet at 473 px: about 150 MiB per row), hence 4.
DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_MAX_QUEUE_DELAY_MS = 5.0
DEFAULT_MAX_QUEUE_SIZE = 64


# -- tensor datatypes
@dataclass(frozen=True)
class DataType:
    """One tensor element type. ``v2``: the Open Inference Protocol name (Triton's config says
    ``TYPE_<v2>``); ``onnx``: the ``onnx.TensorProto`` enum value; ``onnx_name``: its lower-case
    name, as onnxruntime spells types (``tensor(float)``); ``numpy``: the numpy dtype name."""

    v2: str
    onnx: int
    onnx_name: str
    numpy: str

    @property
    def triton(self) -> str:
        return f"TYPE_{self.v2}"

    @property
    def ort(self) -> str:
        return f"tensor({self.onnx_name})"


DATATYPES = (
    DataType("FP32", 1, "float", "float32"),
    DataType("UINT8", 2, "uint8", "uint8"),
    DataType("INT8", 3, "int8", "int8"),
    DataType("UINT16", 4, "uint16", "uint16"),
    DataType("INT16", 5, "int16", "int16"),
    DataType("INT32", 6, "int32", "int32"),
    DataType("INT64", 7, "int64", "int64"),
    DataType("BOOL", 9, "bool", "bool"),
    DataType("FP16", 10, "float16", "float16"),
    DataType("FP64", 11, "double", "float64"),
    DataType("UINT32", 12, "uint32", "uint32"),
    DataType("UINT64", 13, "uint64", "uint64"),
)
BY_V2 = {t.v2: t for t in DATATYPES}
BY_ONNX = {t.onnx: t for t in DATATYPES}
BY_ORT = {t.ort: t for t in DATATYPES}
BY_NUMPY = {t.numpy: t for t in DATATYPES}
