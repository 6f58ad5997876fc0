"""Write the UMAP map of each graph's concepts into its folder (``umap.csv``, ``umap.json``), so that
the explorer's UMAP view answers at once instead of compiling umap-learn on its first use.

    python scripts/umap_cache.py                  # every graph under assets/graphs
    python scripts/umap_cache.py DATA/graphs/NAME # graphs of your own

Each graph's model is loaded as its ``graph.json`` names it; a graph of another revision of that model
than the one installed is skipped with a message (its map would not be its model's).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from age_explorer.explorer.workflows import prompt_for
from age_explorer.core.bundle import load_bundle
from age_explorer.core.graph.embedding_map import UMAP_TABLE, compute_map, read_map, write_map
from age_explorer.core.graph.store import GraphStore
from age_explorer.core.paths import assets_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("graph_dir", nargs="*", help="graph folders (default: every graph under assets/graphs)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    folders = [Path(d) for d in args.graph_dir] or sorted(p for p in (assets_dir() / "graphs").iterdir()
                                                          if GraphStore(p).exists)
    bundles, maps = {}, {}
    status = 0
    for folder in folders:
        store = GraphStore(folder)
        meta = store.meta()
        concepts = list(store.nodes().concept)
        if meta["model"] not in bundles:
            bundles[meta["model"]] = load_bundle(meta["model"], device=args.device)
        bundle = bundles[meta["model"]]
        if meta.get("model_revision") != bundle.revision:
            print(f"{folder}: skipped, the graph is of revision {meta.get('model_revision')} of {meta['model']}, "
                  f"the installed one is {bundle.revision}", file=sys.stderr)
            status = 1
            continue
        prompts = [prompt_for(bundle, c) for c in concepts]
        key = (meta["model"], bundle.revision, tuple(prompts))
        if key not in maps:
            started = time.time()
            maps[key] = compute_map(bundle, prompts)
            print(f"UMAP of {len(concepts)} concepts in {time.time() - started:.1f} s")
        write_map(folder, concepts, prompts, maps[key], meta)
        assert read_map(folder, concepts, meta) is not None
        print(f"{folder / UMAP_TABLE}: written")
    return status


if __name__ == "__main__":
    sys.exit(main())
