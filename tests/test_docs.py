"""The generated parts of the docs match what generates them: results tables and dataset presets."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_results_tables_are_current():
    done = subprocess.run([sys.executable, "render_tables.py", "--check"], cwd=ROOT / "benchmarks",
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_dataset_page_is_current():
    done = subprocess.run([sys.executable, "tools/render_datasets.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_readme_links_resolve():
    import re

    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
