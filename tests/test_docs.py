"""The generated parts of the docs match what generates them: results tables and dataset presets."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_results_tables_are_current():
    done = subprocess.run([sys.executable, "-m", "benchmarks.render_tables", "--check"], cwd=ROOT,
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


def runnable_blocks(text: str) -> list[tuple[str, str]]:
    """(command, expected output) of every ```bash block marked <!-- runnable --> and the ```text block after it."""
    import re

    pattern = r"<!-- runnable -->\s*```bash\n(.*?)```\s*```text\n(.*?)```"
    return [(command.replace("\\\n", " ").strip(), output) for command, output in re.findall(pattern, text, re.S)]


NUMBER = r"(?<![\w/-])\d+\.\d+|(?<![\w/-])\d+(?![\w.])"


def comparable(output: str) -> tuple[list[str], list[str]]:
    """Words and numbers (as printed) of a command's output; timings (a number before ' s)') left out."""
    import re

    output = re.sub(r"[\d.]+ s\)", "s)", output)
    return re.sub(NUMBER, "#", output).split(), re.findall(NUMBER, output)


def test_runnable_usage_commands_print_what_the_docs_show(capsys, monkeypatch):
    """Numbers must match to within 1.5 units of their last printed digit (float rounding between machines);
    counts exactly. The commands run through the CLI's entry point, from the repository root."""
    import shlex

    from diffusion_classifier.cli import main

    monkeypatch.chdir(ROOT)
    blocks = runnable_blocks((ROOT / "docs" / "usage.md").read_text())
    assert len(blocks) >= 2
    for command, expected in blocks:
        argv = shlex.split(command)
        assert argv[0] == "diffusion-classifier"
        capsys.readouterr()
        code = main(argv[1:])
        printed = capsys.readouterr()
        assert code == 0, printed.err
        words, numbers = comparable(printed.out)
        want_words, want_numbers = comparable(expected)
        assert words == want_words, command
        assert len(numbers) == len(want_numbers), command
        for got, want in zip(numbers, want_numbers):
            decimals = len(want.split(".")[1]) if "." in want else 0
            assert abs(float(got) - float(want)) <= (1.5 * 10 ** -decimals if decimals else 0), (command, got, want)
