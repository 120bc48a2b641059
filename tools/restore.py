"""Restore an artefact that left the working tree but stays in git history: a training checkpoint or a
stored benchmark run, from the last commit that held it.

    python tools/restore.py --list                      # what can be restored, and from which commit
    python tools/restore.py checkpoints/fashion-mnist-class
    python tools/restore.py benchmarks/runs/fashion-mnist-text-9051ca0899-test2000-grid50

The files are written where they used to be (untracked there; `git status` shows them). Needs a clone with
history (`git clone` without `--depth`). A folder name alone is looked up under checkpoints/ and
benchmarks/runs/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLACES = ("checkpoints", "benchmarks/runs")


def git(*args: str, binary: bool = False):
    out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, check=True)
    return out.stdout if binary else out.stdout.decode()


def removed_folders() -> dict[str, str]:
    """{folder: commit that last held it} for every folder under PLACES that history has and the tree lacks."""
    found: dict[str, str] = {}
    for place in PLACES:
        log = git("log", "--diff-filter=D", "--name-only", "--format=%H", "--", place)
        commit = None
        for line in log.splitlines():
            if len(line) == 40 and " " not in line and "/" not in line:
                commit = line
            elif line.strip():
                folder = str(Path(line).parent) if place == "checkpoints" else "/".join(line.split("/")[:3])
                if not (ROOT / folder).exists():
                    found.setdefault(folder, commit + "^")  # the deleting commit's parent held it
    return found


def restore(folder: str, commit: str) -> list[Path]:
    written = []
    for name in git("ls-tree", "-r", "--name-only", commit, "--", folder).splitlines():
        data = git("show", f"{commit}:{name}", binary=True)
        path = ROOT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help="a folder under checkpoints/ or benchmarks/runs/ (or its name)")
    parser.add_argument("--list", action="store_true", help="list what can be restored")
    args = parser.parse_args(argv)
    try:
        available = removed_folders()
    except (subprocess.CalledProcessError, FileNotFoundError):
        print("error: this needs git and a clone with history (git clone without --depth)", file=sys.stderr)
        return 2
    if args.list or not args.name:
        for folder, commit in sorted(available.items()):
            print(f"{folder}  (held until {commit[:10]}, restored from its parent)")
        return 0
    name = args.name.rstrip("/")
    candidates = [name] if "/" in name else [f"{place}/{name}" for place in PLACES]
    match = next((c for c in candidates if c in available), None)
    if match is None:
        print(f"error: {name!r} is not a removed checkpoint or run; see --list", file=sys.stderr)
        return 2
    written = restore(match, available[match])
    size = sum(p.stat().st_size for p in written)
    print(f"restored {match} from {available[match]}: {len(written)} files, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
