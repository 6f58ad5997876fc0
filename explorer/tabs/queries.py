"""Read-only graph queries as API endpoints (MCP tools when launched with ``mcp_server=True``); no tab."""

from __future__ import annotations

import gradio as gr

from .. import tools
from .common import Page, error


def build(page: Page) -> None:
    ex = page.explorer

    def answer(query, *args):
        try:
            return query(ex, *args)
        except ValueError as err:
            raise error(str(err)) from None

    def list_graphs() -> list[dict]:
        """List the concept graphs: name, erasure method, preset, target, rows measured, images per concept."""
        return answer(tools.list_graphs)

    def list_concepts(graph: str = "") -> list[dict]:
        """List the concepts of a graph (default: the first) with their groups and baseline capability G0.

        Args:
            graph: a graph name from list_graphs, or empty for the first graph.
        """
        return answer(tools.list_concepts, graph)

    def concept_spillover(concept: str, graph: str = "") -> dict:
        """How much erasing a concept lowered every other concept's capability (Δ = G0 − G after), largest first.

        Args:
            concept: the erased concept, e.g. "red circle".
            graph: a graph name from list_graphs, or empty for the first graph.
        """
        return answer(tools.concept_spillover, concept, graph)

    def nearest_concepts(concept: str, k: int = 5, graph: str = "") -> list[dict]:
        """The k concepts nearest to a concept in the spillover graph (largest mean Δ in both directions).

        Args:
            concept: a concept of the graph, e.g. "red circle".
            k: how many neighbours to return.
            graph: a graph name from list_graphs, or empty for the first graph.
        """
        return answer(tools.nearest_concepts, concept, k, graph)

    def rank_methods() -> list[dict]:
        """Rank the erasure methods of this model's graphs: share of rows erased (G after <= 0.10), mean spillover on
        group neighbours and unrelated concepts, ESR/PSR-1/5, embedding attack success rate, seconds per row."""
        return answer(tools.rank_methods)

    # They read small files and load no model: answered directly, outside the queue, so a query never
    # waits behind other users' plotting and generation (one POST instead of the queue's round trips).
    for query in (list_graphs, list_concepts, concept_spillover, nearest_concepts, rank_methods):
        gr.api(query, api_name=query.__name__, queue=False)
