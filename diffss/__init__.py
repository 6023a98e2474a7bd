"""diffss: DifFSS (arXiv 2307.00773) as a pipeline.

Stages flow one way: ``data`` -> ``conditions`` -> ``generation`` -> ``models``/``train``
-> ``metrics`` -> ``export``. Importing ``diffss`` imports none of them (nor dagster);
import the stage you need, e.g. ``from diffss.data import load_dataset``.
"""

__version__ = "0.1.0"
