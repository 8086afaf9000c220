"""circuit-tracer's attribution-graph viewer for stored graphs, working fully offline.

`export_prompt` turns a prompt's stored base/adapted graph rows into the viewer's JSON (no model,
no re-tracing); `fetch_assets` downloads the viewer's JavaScript libraries, pinned npm packages,
into a local cache; `open_viewer` builds the frontend with those libraries and serves it.
`export_neuronpedia` writes the same graphs in Neuronpedia's graph format, checked against
`neuronpedia_schema.json`.

Names load on first use (as in circuit-tracer's own package): reading graphs imports the tracing
stack (torch), which serving and fetching do not need.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "emc.viewer.assets": (
        "ASSETS",
        "Asset",
        "AssetStatus",
        "asset_cache_dir",
        "check_assets",
        "fetch_assets",
        "require_assets",
    ),
    "emc.viewer.convert": ("FeatureFile", "prompt_tokens", "pruning_scores", "viewer_graph"),
    "emc.viewer.errors": (
        "AmbiguousPromptError",
        "AssetError",
        "ExportDirError",
        "FrontendError",
        "GraphSchemaError",
        "NoExportedGraphsError",
        "NoGraphsError",
        "PromptNotFoundError",
        "ViewerError",
    ),
    "emc.viewer.export": (
        "ExportResult",
        "ExportedGraph",
        "default_out_dir",
        "export_prompt",
        "resolve_prompt_id",
    ),
    "emc.viewer.frontend": ("build_frontend", "rewrite_scripts"),
    "emc.viewer.neuronpedia": (
        "NeuronpediaExportResult",
        "default_neuronpedia_dir",
        "export_neuronpedia",
        "feature_clerp",
        "neuronpedia_graph",
        "neuronpedia_problems",
        "neuronpedia_schema",
        "validate_neuronpedia",
    ),
    "emc.viewer.layout": ("INDEX_FILE",),
    "emc.viewer.server": ("DEFAULT_PORT", "ViewerServer", "open_viewer"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_MODULE_OF[name]), name)
