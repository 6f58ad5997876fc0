"""``age-explorer analyse``: the Section 3 findings of a graph folder, or several graphs compared."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = ("the Section 3 findings of a graph folder, with numbers; "
        "several folders: their spillover compared on the same rows")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("graph_dir", nargs="*", help="graph folders (with --methods: default every shipped toy graph)")
    parser.add_argument("--methods", action="store_true",
                        help="rank the graphs' methods: rows erased, spillover, ESR/PSR, embedding ASR, seconds")
    parser.add_argument("--shared-rows", action="store_true",
                        help="with --methods: measure every graph on the rows all of them have")
    parser.add_argument("--csv", default=None, metavar="FILE", help="with --methods: also write the table as CSV")
    parser.add_argument("--markdown", default=None, metavar="FILE", help="with --methods: also write it as Markdown")
    parser.add_argument("--tables", action="store_true", help="also print the full tables")
    parser.add_argument("--no-similarity", action="store_true", help="skip the similarity measures (no model load)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--offline", action="store_true")
    parser.set_defaults(func=run)


def _three_places(value: float) -> str:
    return f"{value:.3f}"


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from ...bundle import load_bundle
    from ...graph.analysis import (abnormal_nodes, asymmetry, compare_graphs, compare_summary, locality,
                                   paired_against_first, similarity_measures, similarity_vs_delta, summary)
    from ...graph.concept_sets import ConceptSet
    from ...graph.store import GraphStore

    if args.methods:
        return print_methods(args)
    if not args.graph_dir:
        raise ValueError("give at least one graph folder (or --methods for the shipped graphs)")
    stores = {Path(d).name: GraphStore(d) for d in args.graph_dir}
    if len(stores) < len(args.graph_dir):
        raise ValueError("give graph folders with different names, so that the table can tell them apart")
    store = next(iter(stores.values()))
    meta = store.meta()
    concept_set = ConceptSet.from_dict(meta["concept_set"])
    fmt = _three_places
    if len(stores) > 1:
        others = [name for name, s in stores.items() if s.meta()["concept_set"]["concepts"] != concept_set.concepts]
        if others:
            raise ValueError(f"{', '.join(others)} measured another concept set than {next(iter(stores))}")
        table = compare_graphs(stores, concept_set)
        print("mean Delta top-1 on the rows all graphs have; *_lower: rows below the first graph")
        with pd.option_context("display.width", 200, "display.max_columns", 30):
            print(compare_summary(table).to_string(index=False, float_format=fmt))
            print(f"\neach graph against {next(iter(stores))}, row by row: rows lower / tied / higher, "
                  "and the Wilcoxon signed-rank p of the differences")
            print(paired_against_first(table).to_string(index=False, float_format=fmt,
                                                        formatters={"wilcoxon_p": lambda p: f"{p:.2g}"}))
            if args.tables:
                print("\nper row\n" + table.to_string(index=False, float_format=fmt))
            print_recovery(stores, concept_set, args.tables)
        return 0
    similarity = None
    if not args.no_similarity:
        bundle = load_bundle(meta["model"], device=args.device, local_files_only=True if args.offline else None)
        similarity = similarity_measures(bundle, concept_set)
    print(summary(store, concept_set, similarity))
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print_recovery(stores, concept_set, True)
    if args.tables:
        with pd.option_context("display.width", 200, "display.max_columns", 30):
            print("\nlocality per row\n" + locality(store, concept_set).to_string(index=False, float_format=fmt))
            print("\nmost asymmetric pairs\n" + asymmetry(store).to_string(index=False, float_format=fmt))
            print("\nnodes\n" + abnormal_nodes(store).to_string(index=False, float_format=fmt))
            if similarity is not None:
                print("\nsimilarity vs Delta\n"
                      + similarity_vs_delta(store, similarity).to_string(index=False, float_format=fmt))
    return 0


def print_recovery(stores: dict, concept_set, per_row: bool) -> None:
    """Spillover against recovery, for the graphs that have a recovery layer."""
    from ...graph.analysis import recovery_summary, spillover_vs_recovery

    tables = {name: t for name, s in stores.items() if (t := spillover_vs_recovery(s, concept_set)) is not None}
    if not tables:
        return
    print("\nspillover against recovery (rows with a recovery layer): mean Delta top-1 on group neighbours and "
          "unrelated concepts; ASR of the plain prompt and of each attack on the erased model")
    print(recovery_summary(tables).to_string(index=False, float_format=_three_places))
    if per_row:
        for name, table in tables.items():
            print(f"\n{name} per row\n" + table.to_string(index=False, float_format=_three_places))


def print_methods(args: argparse.Namespace) -> int:
    from ...graph.methods import markdown, methods_table
    from ...paths import shipped_graph_dirs

    folders = args.graph_dir or [str(d) for d in shipped_graph_dirs()]
    table = methods_table(folders, shared_rows=args.shared_rows)
    text = markdown(table)
    print(text)
    if args.csv:
        table.to_csv(args.csv, index=False)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0
