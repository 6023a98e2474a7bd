"""The documentation: the mkdocs site builds with --strict (a broken link or anchor, a page missing
from the nav or from docs/, a docstring the API reference cannot render all fail), and the README
stays a page a newcomer reads to the end, with links that lead somewhere."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300
# [text](target) outside code; images too. Targets with a scheme or a leading # are not files.
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_docs_site_builds_strict(tmp_path):
    assert importlib.util.find_spec("mkdocs") is not None, (
        "mkdocs is not installed: install the docs extra (`pip install -c constraints.txt -e '.[docs]'`, "
        "which `make test` does)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-5000:]
    site = tmp_path / "site"
    # the API reference really holds the docstrings (mkdocstrings ran, not an empty page)
    api = (site / "api" / "models" / "index.html").read_text()
    assert "build_model" in api and "FewShotSegmenter" in api
    assert (site / "images" / "demo_auxiliary_grid.png").is_file()


def _prose(text: str) -> str:
    """``text`` without fenced code blocks, whose brackets are not links."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def test_readme_is_short_and_its_links_lead_somewhere():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < README_MAX_LINES
    for name in ("README.md", "CONTRIBUTING.md"):
        text = _prose((ROOT / name).read_text())
        targets = [t for t in LINK.findall(text) if not re.match(r"[a-z]+:|#", t)]
        assert targets, f"{name}: no relative links found; the pattern is broken"
        missing = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
        assert missing == [], f"{name} links to files that do not exist: {missing}"


def test_demo_results_are_one_replaceable_block():
    """The lead reruns the study and replaces the table: it lives between two markers, once."""
    readme = (ROOT / "README.md").read_text()
    assert readme.count("<!-- demo-results:start") == 1 and readme.count("<!-- demo-results:end -->") == 1
    block = readme.split("<!-- demo-results:start")[1].split("<!-- demo-results:end -->")[0]
    assert "miou_without_aux" in block and "What it means" in block
