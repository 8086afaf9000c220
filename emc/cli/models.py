"""`emc models`: fetch the hub files a config needs; `emc check --plan`'s memory table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from emc.cli.app import DataDirOption, app, fail
from emc.config import ConfigError, ExperimentConfig, default_config_path, load_experiment
from emc.console import console, err_console, inline

if TYPE_CHECKING:
    from emc.models.fetch import ManifestEntry, RefListing
    from emc.models.plan import MemoryPlan

models_app = typer.Typer(
    help=(
        "Real models: fetch what a config needs from the Hugging Face hub, before going "
        "offline.\n\n"
        "Run `emc models fetch CONFIG` where the network is available; then every command runs "
        "with HF_HUB_OFFLINE=1 from the caches. `emc check --plan` says how much memory the "
        "config needs per device."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(models_app, name="models")


@models_app.command("fetch")
def fetch(
    config: Annotated[
        Path | None,
        typer.Argument(
            metavar="CONFIG",
            help="Experiment YAML. Default: experiment.yaml in the data directory.",
        ),
    ] = None,
    data_dir: DataDirOption = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="List the files and their sizes; download nothing."),
    ] = False,
) -> None:
    """Fill the Hugging Face and circuit-tracer caches with every hub file CONFIG needs.

    First lists each file (role, repository, revision, path, size) and the total, then
    downloads what the caches lack, with a progress bar; files already there are not
    downloaded again. Models and adapters get their config, tokenizer and safetensors weights
    (no `.bin` or `original/` duplicates) in the Hugging Face cache (HF_HOME); transcoders are
    converted into circuit-tracer's cache (CIRCUIT_TRACER_CACHE_DIR). Local-directory
    references are skipped.

    Every downloaded file is checked against the hub's checksum, and its sha256 is recorded in
    `DATA_DIR/models/fetched.json` with the revision resolved to a commit.

    With HF_HUB_OFFLINE=1 nothing is downloaded: it lists what the caches lack (exit 2) or says
    that nothing does (exit 0).

    Examples:

    `emc models fetch experiment.yaml --dry-run`   (sizes only)

    `emc models fetch experiment.yaml`   (then copy HF_HOME and CIRCUIT_TRACER_CACHE_DIR to an
    offline machine, or run there with HF_HUB_OFFLINE=1)

    Exit codes: 0 everything is in the caches (or listed, with --dry-run); 2 a listing or
    download failed, or offline with files missing.
    """
    from emc.models.fetch import (
        FetchError,
        disk_space_problems,
        fetch_listing,
        list_files,
        missing_files,
        missing_message,
        write_manifest,
    )
    from emc.models.refs import hub_offline

    experiment, resolved, config_path = _experiment(config, data_dir)
    if hub_offline():
        missing = missing_files(experiment, resolved)
        if missing:
            raise fail(missing_message(missing, config_path))
        console.print("HF_HUB_OFFLINE=1: every hub file this config needs is in the caches")
        return
    try:
        listings, skipped = list_files(experiment)
    except FetchError as exc:
        raise fail(str(exc)) from None
    for item in skipped:
        console.print(f"{item.role}: {inline(item.ref)} is {item.reason}", highlight=False)
    if not listings:
        console.print("no hub references in this config: nothing to fetch")
        return
    _print_listing(listings)
    if dry_run:
        console.print("dry run: nothing downloaded")
        return
    problems = disk_space_problems(listings)
    if problems:
        raise fail("not enough disk space, nothing downloaded: " + "; ".join(problems))
    entries = []
    previous = {(e.role, e.ref, e.revision): e for e in _manifest(resolved)}
    with _download_progress() as progress:
        for listing in listings:
            reused = _unchanged(
                listing, previous.get((listing.role, listing.ref, listing.revision))
            )
            if reused is not None:
                entries.append(reused)
                continue
            report = None
            if listing.download_bytes:
                task = progress.add_task(
                    f"{listing.role} {listing.ref}", total=listing.download_bytes
                )

                def report(done: int, task=task) -> None:
                    progress.update(task, completed=done)

            try:
                entries.append(fetch_listing(listing, report))
            except FetchError as exc:
                raise fail(str(exc)) from None
    for listing, entry in zip(listings, entries, strict=True):
        where = inline(str(listing.cache))
        if entry.cache_dtype:
            where += f", tensors {entry.cache_dtype}"
        if not listing.to_download:
            console.print(
                f"{listing.role} {inline(listing.ref)}: already in the cache, nothing downloaded "
                f"({where})",
                highlight=False,
            )
        else:
            console.print(
                f"{listing.role} {inline(listing.ref)}: fetched into {where}", highlight=False
            )
    path = write_manifest(resolved, entries)
    console.print(f"checksums recorded in {inline(str(path))}", highlight=False)


def _experiment(config: Path | None, data_dir: Path | None) -> tuple[ExperimentConfig, Path, Path]:
    try:
        experiment, resolved = load_experiment(config, data_dir)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    return experiment, resolved, config or default_config_path(resolved)


def _manifest(data_dir: Path) -> list[ManifestEntry]:
    from emc.models.errors import ModelLoadError
    from emc.models.fetch import read_manifest

    try:
        return read_manifest(data_dir)
    except ModelLoadError as exc:
        raise fail(str(exc)) from None


def _unchanged(listing: RefListing, entry: ManifestEntry | None) -> ManifestEntry | None:
    """The manifest's entry when nothing is to download and it recorded these very files
    (same commit, paths and sizes): hashing gigabytes again would tell nothing new."""
    if entry is None or listing.to_download or entry.commit != listing.commit:
        return None
    recorded = {(f["repo"], f["commit"], f["path"], f["size"]) for f in entry.files}
    listed = {(f.repo, f.commit, f.path, f.size) for f in listing.files}
    return entry if recorded == listed and all(f.get("sha256") for f in entry.files) else None


def _print_listing(listings: list[RefListing]) -> None:
    from emc.models.plan import human

    table = Table(title="files this config needs from the hub")
    for column, justify in [
        ("role", "left"), ("repository", "left"), ("revision", "left"), ("file", "left"),
        ("size", "right"), ("status", "left"),
    ]:  # fmt: skip
        table.add_column(column, justify=justify, overflow="fold")
    for listing in listings:
        for f in listing.files:
            if listing.kind == "transcoders" and listing.cached:
                status = "in circuit-tracer's cache"
            else:
                status = "present" if f.present else "to download"
            revision = f"{f.revision or 'main'} @ {f.commit[:10]}"
            table.add_row(
                listing.role, Text(f.repo), Text(revision), Text(f.path), human(f.size), status
            )
    console.print(table)
    for listing in listings:
        if listing.note:
            console.print(f"{listing.role}: {inline(listing.note)}", highlight=False)
    to_get = [f for listing in listings for f in listing.to_download]
    have = sum(len(listing.files) for listing in listings) - len(to_get)
    total = sum(listing.download_bytes for listing in listings)
    console.print(
        f"total: {human(sum(listing.total_bytes for listing in listings))}; to download: "
        f"{human(total)} in {len(to_get)} file(s); already present: {have} file(s)",
        highlight=False,
    )


def _download_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        redirect_stdout=False,
        redirect_stderr=False,
    )


# ---------------------------------------------------------------------------------------------
# `emc check`: the offline preflight and the memory plan


def require_fetched(experiment: ExperimentConfig, data_dir: Path, config_path: Path | None) -> None:
    """Offline, exit 2 naming every hub file the config needs and the caches lack."""
    from emc.models.errors import ModelLoadError
    from emc.models.fetch import ensure_fetched

    try:
        ensure_fetched(experiment, data_dir, config_path or default_config_path(data_dir))
    except ModelLoadError as exc:
        raise fail(str(exc)) from None


def show_plan(experiment: ExperimentConfig) -> None:
    """Print the memory plan of `experiment`: a table per device, then advice."""
    from emc.models.plan import PlanError, advise, build_plan

    try:
        plan = build_plan(experiment)
    except PlanError as exc:
        raise fail(str(exc)) from None
    console.print(plan_table(plan))
    tracing = plan.tracing
    console.print(
        f"settings: tracing.batch_size {tracing.batch_size}, max_feature_nodes "
        f"{tracing.max_feature_nodes}, max_n_logits {tracing.max_n_logits}, offload "
        f"{tracing.offload or 'none'}; assumed {plan.active_per_token} active transcoder "
        "features per layer and token; formulas in emc/models/plan.py (estimates: no allocator "
        "slack or CUDA context)",
        highlight=False,
    )
    console.print(
        f"this config runs on {plan.chosen_device} (runtime.device {experiment.runtime.device})",
        highlight=False,
    )
    for line in advise(plan):
        console.print(f"advice: {inline(line)}", highlight=False)


def plan_table(plan: MemoryPlan) -> Table:
    from emc.models.plan import human

    table = Table(title=f"memory plan for {plan.name}")
    table.add_column("what", overflow="fold")
    for dev in plan.devices:
        mark = " (this config)" if dev.device == plan.chosen_device else ""
        table.add_column(f"{dev.device} · {dev.dtype}{mark}", justify="right")

    def row(label: str, values: list[str]) -> None:
        table.add_row(Text(label), *values)

    def count(params: int | None) -> str:
        return "" if params is None else f"{params:,} params; "

    row(
        f"base weights: {plan.base_ref} ({count(plan.base.params)}{plan.base.source})",
        [human(dev.base) for dev in plan.devices],
    )
    if plan.fine_tune is not None:
        label = (
            "adapter (LoRA, merged into a copy of the base at load)"
            if plan.fine_tune_kind == "adapter"
            else "adapted weights"
        )
        row(
            f"{label}: {plan.fine_tune_ref} ({count(plan.fine_tune.params)}"
            f"{plan.fine_tune.source})",
            [human(dev.fine_tune) for dev in plan.devices],
        )
    tc = plan.transcoders
    if tc is None:
        row(f"transcoders: {plan.transcoders_ref} ({plan.transcoders_source})", ["unknown"] * 2)
    else:
        decoders = (
            f"decoders stay on disk (lazy): {tc.decoder_params:,} values not loaded"
            if tc.lazy_decoder
            else "decoders loaded"
        )
        row(
            f"transcoders: {plan.transcoders_ref} ({tc.kind}, {tc.n_layers} layers x "
            f"{tc.d_transcoder:,} features, {count(tc.resident_params + tc.decoder_params)}"
            f"{decoders})",
            [human(dev.transcoders) for dev in plan.devices],
        )
    row("one model loaded (weights + transcoders)", [human(d.one_model) for d in plan.devices])
    if plan.adapted is not None:
        row(
            "both models loaded (discovery keeps base and adapted)",
            [human(d.both_models) for d in plan.devices],
        )
    lengths = {t.n_pos for dev in plan.devices for t in dev.lengths}
    for n_pos in sorted(lengths):
        cells = []
        detail = ""
        for dev in plan.devices:
            total = next(t for t in dev.lengths if t.n_pos == n_pos)
            memory = total.attribution
            detail = (
                f"{memory.active_features:,} active features, {memory.feature_nodes:,} feature "
                f"nodes, adjacency {human(memory.host_adjacency)}"
            )
            if dev.device == "cpu":
                cells.append(human(total.device_peak))
            else:
                cells.append(f"{human(total.device_peak)} GPU + {human(total.host)} RAM")
        row(f"attribution peak at {n_pos} tokens, one model ({detail})", cells)
    return table
