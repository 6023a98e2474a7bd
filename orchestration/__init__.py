"""Dagster orchestration of the diffss pipeline: definitions only, every asset a call into ``diffss``.

``orchestration.definitions.defs`` is the code location; ``python -m orchestration.demo``
materialises one fold headless (what ``make demo`` runs).
"""
