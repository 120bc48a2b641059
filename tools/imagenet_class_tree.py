"""Write the imagenet preset's class tree from WordNet 3.0 (the noun hierarchy ImageNet's ids come from).

    apt-get install wordnet-base                 # Debian's WordNet 3.0 database (data.noun)
    python tools/imagenet_class_tree.py          # adds "class_tree" to resources/datasets/imagenet.json

Each of the 1,000 classes is the synset of its WordNet id (n01440764 = offset 01440764); their hypernym paths
(first hypernym, or instance hypernym, up to 'entity') form a tree, which is cut twice: top groups of at most
--top classes, split into groups of at most --leaf. A group is named by its synset's first lemma (with its
parent's where two groups would share a name). `--class-tree preset` (elimination) descends this tree one
level per round, keeping the best --keep-groups groups.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PRESET = Path(__file__).resolve().parents[1] / "src/diffusion_classifier/resources/datasets/imagenet.json"


def read_nouns(path: Path) -> dict[str, tuple[str, str | None]]:
    """{offset: (first lemma, first hypernym offset or None)} of WordNet's noun synsets."""
    nouns = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue  # the licence header
        fields = line.split(" | ")[0].split()
        offset, n_words = fields[0], int(fields[3], 16)
        lemma = fields[4].replace("_", " ")
        rest = fields[4 + 2 * n_words:]
        n_pointers, pointers = int(rest[0]), rest[1:]
        hypernyms = [pointers[4 * k + 1] for k in range(n_pointers) if pointers[4 * k] in ("@", "@i")
                     and pointers[4 * k + 2] == "n"]
        nouns[offset] = (lemma, hypernyms[0] if hypernyms else None)
    return nouns


def path_to_root(offset: str, nouns: dict) -> list[str]:
    path = [offset]
    while nouns[path[-1]][1] is not None:
        path.append(nouns[path[-1]][1])
    return path[::-1]  # root first


def build_tree(wnids: list[str], classes: list[str], nouns: dict, top: int, leaf: int) -> dict:
    paths = {c: path_to_root(w[1:], nouns) for w, c in zip(wnids, classes)}
    children: dict[str, list[str]] = {}
    members: dict[str, list[str]] = {}
    for name, path in paths.items():
        for depth, node in enumerate(path):
            members.setdefault(node, []).append(name)
            if depth + 1 < len(path) and path[depth + 1] not in children.setdefault(node, []):
                children[node].append(path[depth + 1])

    def cut(node: str, limit: int) -> list[str]:
        """Descendants of `node` holding at most `limit` classes each, as high in the tree as possible."""
        if len(members[node]) <= limit or not children.get(node):
            return [node]
        out = []
        for child in children[node]:
            out += cut(child, limit)
        return out

    root = paths[classes[0]][0]
    used: set[str] = set()

    def named(node: str, parent: str | None) -> str:
        name = nouns[node][0]
        if name in used and parent:
            name = f"{name} ({nouns[parent][0]})"
        k = 2
        base = name
        while name in used:
            name, k = f"{base} {k}", k + 1
        used.add(name)
        return name

    tree, placed = {}, set()
    for group in cut(root, top):
        subtree = {}
        for sub in cut(group, leaf):
            names = [c for c in members[sub] if c not in placed]
            placed.update(names)
            if names:
                subtree[named(sub, group)] = names
        if subtree:
            tree[named(group, None)] = subtree if len(subtree) > 1 else next(iter(subtree.values()))
    assert placed == set(classes), "every class once"
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wordnet", default="/usr/share/wordnet/data.noun")
    parser.add_argument("--top", type=int, default=200, help="classes per top group, at most")
    parser.add_argument("--leaf", type=int, default=20, help="classes per second-level group, at most")
    args = parser.parse_args()
    preset = json.loads(PRESET.read_text(encoding="utf-8"))
    tree = build_tree(preset["folders"], preset["classes"], read_nouns(Path(args.wordnet)), args.top, args.leaf)
    preset["class_tree"] = tree
    PRESET.write_text(json.dumps(preset, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    sizes = [sum(len(v) for v in g.values()) if isinstance(g, dict) else len(g) for g in tree.values()]
    print(f"{len(tree)} top groups of {min(sizes)}-{max(sizes)} classes; written to {PRESET}")


if __name__ == "__main__":
    main()
