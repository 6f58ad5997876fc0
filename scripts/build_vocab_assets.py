#!/usr/bin/env python3
"""Regenerate the candidate-vocabulary and concept-set CSVs under ``assets/``.

Outputs (UTF-8, header row, ``\\n`` line endings):

* ``assets/vocab/imagenet_classes.csv``   -- ``index,name,all_names`` for the
  1000 ImageNet-1k classes in the standard class-index order (the sorted
  WordNet synset ids: 0 = tench, ..., 999 = toilet tissue).  ``name`` is the
  first lemma of the synset, ``all_names`` the full comma-separated lemma list.
* ``assets/vocab/english_3000.csv``       -- ``word``: the first 3000 entries of
  ``wordfreq.top_n_list("en", N)`` that match ``^[a-z]+$`` (frequency order).
* ``assets/concept_sets/imagenette.csv``  -- ``concept,imagenet_index,group``.
* ``assets/concept_sets/netfive.csv``     -- same columns, 25 classes in 5 groups.

Data sources (all offline, read from files shipped inside PyPI wheels; neither
torch nor timm is imported):

* ``timm`` 1.0.31: ``timm/data/_info/imagenet_synsets.txt`` (the 1000 synset
  ids in class-index order) and ``timm/data/_info/imagenet_synset_to_lemma.txt``
  (tab-separated ``synset<TAB>lemma, lemma, ...``).
* ``wordfreq`` 3.1.1 (with its dependencies ``msgpack``, ``langcodes``,
  ``ftfy``, ``regex``, ``locate``).
* optional cross-check: ``torchvision`` 0.29.1, ``torchvision/models/_meta.py``
  (``_IMAGENET_CATEGORIES``), parsed with ``ast``.

Reproduce in a throwaway venv (no torch needed)::

    python3 -m venv /tmp/vocabvenv
    /tmp/vocabvenv/bin/pip install wordfreq==3.1.1
    /tmp/vocabvenv/bin/pip install --no-deps timm==1.0.31
    /tmp/vocabvenv/bin/python scripts/build_vocab_assets.py

Instead of installing timm, ``--timm-wheel PATH`` reads the two files straight
from a downloaded wheel (``pip download --no-deps timm==1.0.31``).  Passing
``--torchvision-wheel PATH`` additionally checks that every class's primary
name agrees with torchvision's category list (known, expected differences are
reported, not fatal).  The concept-set indices are resolved by looking the
ImageNet names up in the lemma lists and are then asserted against the
explicit indices below, so a changed upstream list fails loudly.
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import re
import sys
import zipfile
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

TIMM_SYNSETS = "timm/data/_info/imagenet_synsets.txt"
TIMM_LEMMAS = "timm/data/_info/imagenet_synset_to_lemma.txt"
TV_META = "torchvision/models/_meta.py"

N_WORDS = 3000

# Spot checks of the standard class order: index -> expected primary name.
KNOWN_INDICES = {
    0: "tench",
    1: "goldfish",
    207: "golden retriever",
    217: "English springer",
    218: "Welsh springer spaniel",
    402: "acoustic guitar",
    407: "ambulance",
    417: "balloon",
    482: "cassette player",
    491: "chain saw",
    497: "church",
    566: "French horn",
    569: "garbage truck",
    571: "gas pump",
    574: "golf ball",
    701: "parachute",
    999: "toilet tissue",
}

# (concept as written in the AGE paper, ImageNet lemma to look up, expected index)
IMAGENETTE = [
    ("Tench", "tench", 0),
    ("English Springer", "English springer", 217),
    ("Cassette Player", "cassette player", 482),
    ("Chain Saw", "chain saw", 491),
    ("Church", "church", 497),
    ("French Horn", "French horn", 566),
    ("Garbage Truck", "garbage truck", 569),
    ("Gas Pump", "gas pump", 571),
    ("Golf Ball", "golf ball", 574),
    ("Parachute", "parachute", 701),
]

# group -> [(concept, ImageNet lemma, expected index)], Imagenette anchor first.
NETFIVE = {
    "Dogs": [
        ("English Springer", "English springer", 217),
        ("Clumber Spaniel", "clumber spaniel", 216),
        ("English Setter", "English setter", 212),
        ("Blenheim Spaniel", "Blenheim spaniel", 156),
        ("Border Collie", "Border collie", 232),
    ],
    "Vehicles": [
        ("Garbage Truck", "garbage truck", 569),
        ("Moving Van", "moving van", 675),
        ("Fire Engine", "fire engine", 555),
        ("Ambulance", "ambulance", 407),
        ("School Bus", "school bus", 779),
    ],
    "Instruments": [
        ("French Horn", "French horn", 566),
        ("Bassoon", "bassoon", 432),
        ("Trombone", "trombone", 875),
        ("Oboe", "oboe", 683),
        ("Saxophone", "saxophone", 776),
    ],
    "Buildings": [
        ("Church", "church", 497),
        ("Monastery", "monastery", 663),
        ("Bell Cote", "bell cote", 442),
        ("Dome", "dome", 538),
        ("Library", "library", 624),
    ],
    "Devices": [
        ("Cassette Player", "cassette player", 482),
        ("Polaroid Camera", "Polaroid camera", 732),
        ("Loudspeaker", "loudspeaker", 632),
        ("Typewriter Keyboard", "typewriter keyboard", 878),
        ("Projector", "projector", 745),
    ],
}


def _read_from_wheel(wheel: Path, member: str) -> str:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(member).decode("utf-8")


def _read_from_dist(dist_name: str, member: str) -> str:
    """Read a data file of an installed distribution without importing it."""
    dist = metadata.distribution(dist_name)
    return Path(dist.locate_file(member)).read_text(encoding="utf-8")


def _read(dist_name: str, wheel: Path | None, member: str) -> str:
    if wheel is not None:
        return _read_from_wheel(wheel, member)
    return _read_from_dist(dist_name, member)


def load_imagenet_classes(timm_wheel: Path | None) -> list[list[str]]:
    """Return, in class-index order, each class's list of lemmas."""
    synsets = _read("timm", timm_wheel, TIMM_SYNSETS).split()
    if len(synsets) != 1000 or len(set(synsets)) != 1000:
        raise SystemExit(f"expected 1000 distinct synsets, got {len(synsets)}")
    if synsets != sorted(synsets):
        raise SystemExit("synset list is not in sorted (standard) order")
    lemmas: dict[str, str] = {}
    for line in _read("timm", timm_wheel, TIMM_LEMMAS).splitlines():
        if line.strip():
            wnid, names = line.split("\t", 1)
            lemmas[wnid] = names.strip()
    classes = []
    for wnid in synsets:
        names = [n.strip() for n in lemmas[wnid].split(",") if n.strip()]
        classes.append(names)
    return classes


def load_torchvision_names(tv_wheel: Path) -> list[str]:
    tree = ast.parse(_read_from_wheel(tv_wheel, TV_META))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_IMAGENET_CATEGORIES" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise SystemExit("_IMAGENET_CATEGORIES not found in torchvision wheel")


def resolve(classes: list[list[str]], lemma: str, expected: int) -> int:
    """Index of the unique class whose lemma list contains ``lemma`` exactly."""
    hits = [i for i, names in enumerate(classes) if lemma in names]
    if hits != [expected]:
        raise SystemExit(f"lemma {lemma!r}: found indices {hits}, expected [{expected}]")
    return expected


def english_words(n: int) -> list[str]:
    import wordfreq

    pat = re.compile(r"^[a-z]+$")
    size = n
    while True:
        size *= 2
        words = [w for w in wordfreq.top_n_list("en", size) if pat.match(w)]
        if len(words) >= n:
            return words[:n]


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")
    print(f"wrote {path.relative_to(REPO_ROOT)} ({len(rows)} rows)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timm-wheel", type=Path, help="read timm data from this wheel")
    ap.add_argument("--torchvision-wheel", type=Path, help="cross-check names against it")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "assets")
    args = ap.parse_args(argv)

    classes = load_imagenet_classes(args.timm_wheel)
    for idx, name in KNOWN_INDICES.items():
        if classes[idx][0] != name:
            raise SystemExit(f"index {idx}: expected {name!r}, got {classes[idx][0]!r}")

    if args.torchvision_wheel is not None:
        tv = load_torchvision_names(args.torchvision_wheel)
        diffs = [(i, c[0], t) for i, (c, t) in enumerate(zip(classes, tv)) if c[0] != t]
        print(f"torchvision cross-check: {len(diffs)} primary names differ")
        for i, ours, theirs in diffs:
            print(f"  {i}: timm {ours!r} vs torchvision {theirs!r}")

    write_csv(
        args.out / "vocab" / "imagenet_classes.csv",
        ["index", "name", "all_names"],
        [[i, names[0], ", ".join(names)] for i, names in enumerate(classes)],
    )
    write_csv(
        args.out / "vocab" / "english_3000.csv",
        ["word"],
        [[w] for w in english_words(N_WORDS)],
    )
    write_csv(
        args.out / "concept_sets" / "imagenette.csv",
        ["concept", "imagenet_index", "group"],
        [[c, resolve(classes, lemma, exp), c] for c, lemma, exp in IMAGENETTE],
    )
    write_csv(
        args.out / "concept_sets" / "netfive.csv",
        ["concept", "imagenet_index", "group"],
        [
            [c, resolve(classes, lemma, exp), group]
            for group, members in NETFIVE.items()
            for c, lemma, exp in members
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
