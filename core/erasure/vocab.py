"""The concept space of AGE: candidate vocabularies, the L2 prefilter and the 1-D k-means picks."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bundle import ModelBundle
from ..paths import assets_dir

BUILT_IN = ("imagenet", "en3k")


def load_vocabulary(name: str, bundle: ModelBundle | None = None) -> list[str]:
    """Candidate words/phrases of a built-in vocabulary, of the model's backend (the vocabulary named
    after it, e.g. ``toy``), or of a file with one per line."""
    if bundle is not None and name == bundle.kind:
        words = bundle.backend.candidate_vocabulary()
        if words is None:
            raise ValueError(f"the {bundle.kind} backend ships no candidate vocabulary; use {', '.join(BUILT_IN)}")
        return words
    if name == "imagenet":
        with open(assets_dir() / "vocab" / "imagenet_classes.csv", newline="") as f:
            names = [row["name"] for row in csv.DictReader(f)]
        return list(dict.fromkeys(names))  # two class names appear twice (crane, maillot)
    if name == "en3k":
        with open(assets_dir() / "vocab" / "english_3000.csv", newline="") as f:
            return [row["word"] for row in csv.DictReader(f)]
    path = Path(name)
    if path.is_file():
        words = _read_word_file(path)
        if not words:
            raise ValueError(f"vocabulary file {path} is empty")
        return list(dict.fromkeys(words))
    own = f"{bundle.kind}, " if bundle is not None and bundle.backend.candidate_vocabulary() is not None else ""
    raise ValueError(f"unknown vocabulary {name!r}: use {own}{', '.join(BUILT_IN)} or a file with one candidate per line"
                     + ("" if bundle is not None else " (a model's own vocabulary needs its model)"))


def _read_word_file(path: Path) -> list[str]:
    """One candidate per line, or the ``word`` column of a CSV whose header names it: the format of the
    reference code's ``data/english_3000.csv``, which cannot be shipped here (docs/erasure.md), so that
    a user who has it passes the file as it is and gets exactly its 3000 words."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames and "word" in reader.fieldnames:
                return [w for w in (row["word"].strip() for row in reader if row["word"]) if w]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@dataclass
class CandidateSet:
    """The candidates of one erased concept: names, prompt hidden states (n, L, D), L2 distances."""

    concept: str
    names: list[str]
    states: torch.Tensor
    distances: torch.Tensor
    excluded: list[str]


@torch.no_grad()
def build_candidates(bundle: ModelBundle, concept: str, words: list[str], template: str, k_closest: int,
                     num_centers: int, exclude: list[str], batch_size: int = 256) -> CandidateSet:
    """Prefilter by L2 distance of flattened prompt hidden states, then 1-D k-means on the distances.

    The erased concept itself and ``exclude`` (user synonyms, other erased concepts) are removed
    first, case-insensitively: the reference code kept them, so its search could pick a synonym.
    """
    banned = {concept.lower()} | {e.lower() for e in exclude}
    kept = [w for w in dict.fromkeys(words) if w.lower() not in banned]
    excluded = [w for w in words if w.lower() in banned]
    if not kept:
        raise ValueError(f"no candidate target left for {concept!r} after excluding it and its synonyms")
    anchor = bundle.encode([template.format(c=concept)]).float().flatten(1)
    states, dists = [], []
    for start in range(0, len(kept), batch_size):
        chunk = bundle.encode([template.format(c=w) for w in kept[start:start + batch_size]]).float()
        states.append(chunk.cpu())
        dists.append((chunk.flatten(1) - anchor).norm(dim=1).cpu())
    states_all, dist_all = torch.cat(states), torch.cat(dists)
    # Identical hidden states mean an identical prompt after tokenisation (e.g. case): a synonym.
    same = dist_all <= 1e-6
    if same.any():
        excluded += [kept[i] for i in same.nonzero().flatten().tolist()]
        keep_idx = (~same).nonzero().flatten()
        kept = [kept[i] for i in keep_idx.tolist()]
        states_all, dist_all = states_all[keep_idx], dist_all[keep_idx]
        if not kept:
            raise ValueError(f"no candidate target left for {concept!r}: all encode like the concept itself")
    order = dist_all.argsort()[:k_closest]
    if len(order) > num_centers:
        order = _kmeans_picks(dist_all, order, num_centers)
    return CandidateSet(concept, [kept[i] for i in order.tolist()], states_all[order].to(bundle.device),
                        dist_all[order], excluded)


def _kmeans_picks(distances: torch.Tensor, order: torch.Tensor, num_centers: int) -> torch.Tensor:
    """The reference's 'k-means centres': cluster the scalar distances, take the word nearest each centre."""
    from sklearn.cluster import KMeans

    d = distances[order].numpy().reshape(-1, 1)
    centres = KMeans(n_clusters=num_centers, random_state=0, n_init=10).fit(d).cluster_centers_.ravel()
    picks = sorted({int(abs(d.ravel() - c).argmin()) for c in centres})
    return order[torch.tensor(picks)]
