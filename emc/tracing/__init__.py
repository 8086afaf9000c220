"""Attribution graphs: targets from labels, circuit-tracer's attribution, compact queryable rows.

The dense graph lives only in memory (and, on request, in a side file); the store keeps the pruned
nodes and edges as rows, plus a summary row per graph.
"""

from emc.tracing.agreement import LogitAgreement, logit_agreement
from emc.tracing.attribution import (
    NonFiniteGraphError,
    Traced,
    is_out_of_memory,
    memory_fallback,
    release_memory,
    targets_for,
    trace,
    with_memory_fallback,
)
from emc.tracing.compact import (
    EDGE_COLUMNS,
    NODE_COLUMNS,
    CompactGraph,
    GraphEdge,
    GraphLayout,
    GraphNode,
    GraphTarget,
    compact_graph,
    graph_targets,
)
from emc.tracing.pipeline import TracedPrompt, summarize_graph, trace_prompt
from emc.tracing.pruning import Influence, PruneMasks, node_influence, prune
from emc.tracing.quality import GraphQuality, NodeCounts, graph_quality
from emc.tracing.record import GraphKey, GraphRecord, graph_key
from emc.tracing.sidefile import SideFile, SideFileError, load_side_file, write_side_file
from emc.tracing.targets import (
    CONTRASTIVE_LABEL,
    TargetError,
    TargetPlan,
    build_targets,
    contrastive_target,
    demeaned_unembedding,
    plan_targets,
)

__all__ = [
    "CONTRASTIVE_LABEL",
    "EDGE_COLUMNS",
    "NODE_COLUMNS",
    "CompactGraph",
    "GraphEdge",
    "GraphKey",
    "GraphLayout",
    "GraphNode",
    "GraphQuality",
    "GraphRecord",
    "GraphTarget",
    "Influence",
    "LogitAgreement",
    "NodeCounts",
    "NonFiniteGraphError",
    "PruneMasks",
    "SideFile",
    "SideFileError",
    "TargetError",
    "TargetPlan",
    "Traced",
    "TracedPrompt",
    "build_targets",
    "compact_graph",
    "contrastive_target",
    "demeaned_unembedding",
    "graph_key",
    "graph_quality",
    "graph_targets",
    "is_out_of_memory",
    "load_side_file",
    "logit_agreement",
    "memory_fallback",
    "node_influence",
    "plan_targets",
    "prune",
    "release_memory",
    "summarize_graph",
    "targets_for",
    "trace",
    "trace_prompt",
    "with_memory_fallback",
    "write_side_file",
]
