"""Widgets more than one page uses: picking a prompt and one of its base/adapted graph pairs.

Rejected prompts carry a mark in the prompt box and stale pairs one in the pair box.
"""

from __future__ import annotations

from dashboard import graphs_view
from emc.store import Store
from emc.store.graph_pairs import GraphPair


def pick_pair(store: Store, pairs: list[GraphPair], prompt_col, pair_col, key: str) -> GraphPair:
    """A prompt box and, for the chosen prompt, a box of its pairs (target modes, adapters).

    `key` prefixes the widget keys, so each page keeps its own choice.
    """
    prompts = graphs_view.prompts_of(store, pairs)
    rejected = {p.prompt_id for p in pairs if p.rejected}
    prompt_id = prompt_col.selectbox(
        "Prompt",
        list(dict.fromkeys(p.prompt_id for p in pairs)),
        format_func=lambda pid: graphs_view.prompt_label(pid, prompts, rejected),
        key=f"{key}-prompt",
    )
    choices = {graphs_view.pair_key(p): p for p in pairs if p.prompt_id == prompt_id}
    chosen = pair_col.selectbox(
        f"Graph pair ({len(choices)} for this prompt)",
        list(choices),
        format_func=lambda k: graphs_view.pair_label(choices[k]),
        key=f"{key}-pair-{prompt_id}",
    )
    return choices[chosen]
