"""`make bench`: run every ``benchmarks/bench_*.py`` and write ``benchmarks/results/latest.json``.

Each module exposes ``run() -> dict[str, float]``; results are ratios or rates measured in one
run on this machine, so they compare like with like. The file is one flat object, name -> number.
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
import time
from pathlib import Path

from diffss.core.atomic import write_text_atomic

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "latest.json"


def main(argv: list[str] | None = None) -> int:
    selected = set(argv if argv is not None else sys.argv[1:])
    results: dict[str, float] = {}
    for path in sorted(HERE.glob("bench_*.py")):
        name = path.stem
        if selected and name not in selected:
            continue
        start = time.perf_counter()
        print(f"running {name} ...", flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        for key, value in module.run().items():
            results[key] = float(value)
        print(f"  {name} took {time.perf_counter() - start:.1f} s", flush=True)
    write_text_atomic(RESULTS, json.dumps(results, indent=2, sort_keys=True) + "\n")
    width = max((len(k) for k in results), default=10)
    print(f"\nbenchmarks on {platform.processor() or platform.machine()} -> {RESULTS.relative_to(HERE.parent)}")
    for key in sorted(results):
        print(f"{key:<{width}}  {results[key]:10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
