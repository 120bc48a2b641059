"""Run several CLI invocations in one process (one interpreter start-up instead of one per case).

    python tests/cli_cases.py CASES.json OUT.json

CASES.json: a list of {"argv": [...], "env": {...}, "hub_cache": DIR}. Each case runs `cli.main(argv)` with
`env` set for its duration and huggingface_hub's cache at `hub_cache`; OUT.json gets, per case, its exit code,
stdout, stderr and the lines the fake hub logged while it ran (FAKE_HUB_LOG). Settings read once at import
(HF_ENDPOINT, HF_HUB_OFFLINE) come from this process's own environment.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path


def _log_lines() -> list[str]:
    log = Path(os.environ.get("FAKE_HUB_LOG", "/nonexistent"))
    return log.read_text().splitlines() if log.is_file() else []


def main() -> None:
    from huggingface_hub import constants

    from diffusion_classifier.cli import main as cli_main

    cases = json.loads(Path(sys.argv[1]).read_text())
    results = []
    for case in cases:
        saved = {key: os.environ.get(key) for key in case.get("env", {})}
        os.environ.update(case.get("env", {}))
        if case.get("hub_cache"):
            constants.HF_HUB_CACHE = case["hub_cache"]
        before = len(_log_lines())
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli_main(case["argv"])
            except SystemExit as exc:  # argparse errors
                code = exc.code
            except Exception as exc:  # a traceback is a failure the test reports
                code, err = "traceback", io.StringIO(err.getvalue() + f"{type(exc).__name__}: {exc}")
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                        "fetched": _log_lines()[before:]})
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
