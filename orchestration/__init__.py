"""Dagster orchestration of the diffss pipeline (definitions only; the work is in ``diffss``).

``orchestration.definitions.defs`` is the code location; ``python -m orchestration.demo``
materialises the whole graph for the demo partition headless.
"""
