"""circuit-tracer's graph viewer, offline: `emc graph export`, `serve` and `assets`."""

from __future__ import annotations

import signal
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from emc.cli.app import ConfigOption, DataDirOption, app, data_dir_from, existing_store, fail
from emc.console import console, escape_control

graph_app = typer.Typer(
    help=(
        "View attribution graphs in circuit-tracer's viewer, fully offline.\n\n"
        "`emc graph export PROMPT_ID` writes a prompt's base and adapted graphs as viewer files "
        "(or, with --format neuronpedia, as Neuronpedia graph files), "
        "`emc graph serve` opens them in the browser. The viewer's JavaScript libraries come "
        "from a local cache that `emc graph assets` fills (scripts/install.sh runs it)."
    ),
    no_args_is_help=True,
)
app.add_typer(graph_app, name="graph")

OutOption = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Directory of viewer files. Default: viewer/ in the data directory.",
    ),
]


class ExportFormat(StrEnum):
    viewer = "viewer"
    neuronpedia = "neuronpedia"


def _out_dir(
    out: Path | None,
    data_dir: Path | None,
    config: Path | None,
    export_format: ExportFormat = ExportFormat.viewer,
) -> Path:
    from emc.config import ConfigError
    from emc.viewer import default_neuronpedia_dir, default_out_dir

    if out is not None:
        return out.expanduser().resolve()
    default = (
        default_neuronpedia_dir if export_format is ExportFormat.neuronpedia else default_out_dir
    )
    try:
        return default(data_dir_from(data_dir, config))
    except ConfigError as exc:
        raise fail(str(exc)) from None


@graph_app.command("export")
def graph_export(
    prompt_id: Annotated[
        str,
        typer.Argument(help="A prompt id, or a unique start of one (`emc prompt list`)."),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output directory. Default: viewer/ in the data directory (neuronpedia/ with "
            "--format neuronpedia).",
        ),
    ] = None,
    export_format: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            "-f",
            help="viewer: circuit-tracer's viewer files for `emc graph serve`. neuronpedia: one "
            "JSON file per graph in Neuronpedia's attribution-graph format, checked against "
            "emc/viewer/neuronpedia_schema.json before anything is written.",
        ),
    ] = ExportFormat.viewer,
    scan: Annotated[
        str | None,
        typer.Option(
            help="With --format neuronpedia: metadata.scan, the Neuronpedia model id the graphs "
            "are filed under (letters, digits, _ and -). Default: the base model's name.",
        ),
    ] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Write a prompt's base and adapted graphs as viewer or Neuronpedia files, from the stored
    rows.

    Every successful base/adapted pair of the prompt (made by `emc trace`) becomes one file per
    graph, `<prompt>-<role>-<targets>.json`. No model is loaded. Exporting again replaces the
    files.

    --format viewer (the default) also writes graph-metadata.json and feature files (clicking a
    feature shows where it is active in the exported prompts). Then: `emc graph serve`.

    --format neuronpedia writes the graphs in the JSON that Neuronpedia's circuit viewer loads
    and its upload accepts (https://www.neuronpedia.org/graph/validator): feature nodes are
    described by their feature card's top logit tokens where `emc feature cards` made one, and
    metadata.info.emc records the model, role (base/adapted), run and precision.
    """
    if scan is not None and export_format is not ExportFormat.neuronpedia:
        raise fail("--scan is for --format neuronpedia only (viewer files name their own scan)")
    store = existing_store(data_dir, config)
    target = _out_dir(out, data_dir, config, export_format)
    if export_format is ExportFormat.neuronpedia:
        _export_neuronpedia(store, prompt_id, target, scan)
    else:
        _export_viewer(store, prompt_id, target, out, data_dir)


def _export_neuronpedia(store, prompt_id: str, target: Path, scan: str | None) -> None:
    from emc.viewer import ViewerError, export_neuronpedia
    from emc.viewer.neuronpedia import VALIDATOR_URL

    try:
        result = export_neuronpedia(store, prompt_id, target, scan=scan)
    except ViewerError as exc:
        raise fail(str(exc)) from None
    name = escape_control(result.prompt_name)  # stored text: neither markup nor controls
    console.print(
        f"prompt {result.prompt_id} ({name}): Neuronpedia graphs, scan {result.scan}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    for graph in result.graphs:
        console.print(
            f"  {graph.role:8} {graph.path}  ({graph.nodes} nodes, {graph.edges} links)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"every file matches Neuronpedia's graph schema; next: upload them at {VALIDATOR_URL} "
        "(the scan must name a model Neuronpedia has: --scan sets it)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _export_viewer(
    store, prompt_id: str, target: Path, out: Path | None, data_dir: Path | None
) -> None:
    from emc.viewer import ViewerError, export_prompt

    try:
        result = export_prompt(store, prompt_id, target)
    except ViewerError as exc:
        raise fail(str(exc)) from None
    name = escape_control(result.prompt_name)  # stored text: neither markup nor controls
    console.print(
        f"prompt {result.prompt_id} ({name}):", markup=False, highlight=False, soft_wrap=True
    )
    for graph in result.graphs:
        console.print(
            f"  {graph.role:8} {graph.path}  ({graph.nodes} nodes, {graph.edges} edges)",
            highlight=False,
            soft_wrap=True,
        )
    console.print(f"  index    {result.index}", highlight=False, soft_wrap=True)
    console.print(
        f"  {result.feature_files} feature files in {result.out_dir / 'features'}",
        highlight=False,
        soft_wrap=True,
    )
    serve = "emc graph serve" + (f" --out {result.out_dir}" if out is not None else "")
    if out is None and data_dir is not None:
        serve += f" -d {data_dir}"
    console.print(f"next: `{serve}`, then open the printed URL", highlight=False, soft_wrap=True)
    for path in compare_paths(result.graphs):
        console.print(f"  side by side: {path}", highlight=False, soft_wrap=True)


def compare_paths(graphs) -> list[str]:
    """The compare page's address (under the served URL) for each base/adapted pair exported."""
    from emc.viewer.frontend import COMPARE_PAGE

    bases = [g for g in graphs if g.role == "base"]
    adapted = [g for g in graphs if g.role == "adapted"]
    return [
        f"/{COMPARE_PAGE}?base={b.slug}&adapted={a.slug}"
        for b in bases
        for a in adapted
        if a.targets == b.targets
    ]


@graph_app.command("serve")
def graph_serve(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: any free port).")] = 8032,
    out: OutOption = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Serve the exported graphs with circuit-tracer's viewer; Ctrl-C stops it.

    The page is circuit-tracer's own, with its CDN scripts replaced by the verified local copies
    from `emc graph assets`: nothing is fetched from the internet. The Save button stores the
    page's pins and groupings in the graph's file.
    """
    from emc.viewer import ViewerError, open_viewer

    target = _out_dir(out, data_dir, config)
    try:
        with open_viewer(target, port=port) as viewer:
            console.print(
                f"viewer on {viewer.url} (graphs: {target}); Ctrl-C stops it",
                highlight=False,
                soft_wrap=True,
            )
            # SIGTERM stops it like Ctrl-C, so the temporary frontend is removed either way. Ctrl-C
            # is armed explicitly: a process started in the background of a non-interactive
            # shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
            previous = signal.signal(signal.SIGTERM, _interrupt)
            previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                viewer.serve_forever()
            except KeyboardInterrupt:
                console.print("stopped")
            finally:
                signal.signal(signal.SIGTERM, previous)
                signal.signal(signal.SIGINT, previous_int)
    except ViewerError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"cannot serve on port {port}: {exc}; pick another with --port") from None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@graph_app.command("assets")
def graph_assets(
    cache: Annotated[
        Path | None,
        typer.Option(
            help="Cache directory. Default: $EMC_VIEWER_ASSETS, else ~/.cache/emc/viewer-assets."
        ),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Only verify the cache; download nothing.")
    ] = False,
) -> None:
    """Download the viewer's JavaScript libraries (pinned npm packages) and verify them.

    d3, d3-collection, d3-jetpack, dagre and pako come from the npm registry as tarballs whose
    sha512 must match the pins in emc/viewer/assets.py; verified files are not downloaded again.
    """
    from emc.viewer import AssetError, check_assets, fetch_assets

    try:
        statuses = check_assets(cache) if check else fetch_assets(cache)
    except AssetError as exc:
        raise fail(str(exc)) from None
    for status in statuses:
        asset = status.asset
        console.print(
            f"  {status.state:10} {asset.package}@{asset.version}  {status.path}",
            highlight=False,
            soft_wrap=True,
        )
    if any(s.state in ("missing", "corrupted") for s in statuses):
        raise fail("some libraries are missing or corrupted: run `emc graph assets`")
    console.print("viewer assets ready")
