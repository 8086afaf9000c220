"""Logits throughput: EMC's batched scoring against two baselines, in one run.

Run as `python benchmarks/logits_throughput.py [--data-dir D] [--prompts N] [--repeats R]
[--small] [--threads T] [--json PATH]`.

Three ways score the same token ids of the same N prompts with the same two replacement models
(base, adapted) of the organism:

- EMC: load both models once, then `score_prompts` over every prompt in batches of 32 (top-k,
  the other model's top-k, ranks, probabilities, divergence).
- baseline A, the original loop: what the original pipeline did. Per prompt, load both models
  from scratch, one unbatched forward each, top-k, and release both before the next load. It
  runs in a subprocess (`original_loop.py`) that imports only what the original imported (torch,
  transformers, peft, circuit-tracer), not EMC's pydantic models, DuckDB and pandas. A release
  drops the references, and also runs `gc.collect()` only if that is what frees the models.
- baseline B, load once and one prompt at a time: the strongest honest alternative without
  batching. Both models loaded once, then one unbatched forward per prompt and model, top-k.

A and B use the fastest unbatched forward (the HF module the replacement model wraps, under
`inference_mode`, without EMC's NaN guard). EMC's batches go through the same module, so A and
B differ only in loading, and B and EMC only in batching and the extra work EMC does per prompt.

Timing rules, the same for all three: a way's time runs from its first model load to its last
top-k, so loads are included; the final release of the models is not (A's releases between
prompts are: the next load needs them). Before timing, each process runs an untimed warm-up (a
load and a forward) so that imports, the file cache and first-call costs are paid by nobody.
Each way runs `--repeats` times, EMC and B interleaved; the run with the median total is
reported, the other totals are kept in the JSON.

The ways must agree: the same top-k token ids, in rank order, for every prompt and both models;
the process exits 1 if any differ. The figures go to stdout's last line as JSON, and to `--json
PATH` if given.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from itertools import cycle, islice
from pathlib import Path

import torch
from pydantic import BaseModel, computed_field

from emc.config import ExperimentConfig
from emc.models import LoadedModel, load_replacement_model, resolve_precision
from emc.models.factory import resolve_adapter_dir
from emc.models.refs import resolve_model_dir
from emc.models.transcoders import inspect_transcoders
from emc.organism import Lexicon, OrganismRecipe
from emc.organism.experiment import prepare_organism
from emc.pivotal.logits import score_prompts, tokenize_prompts
from emc.pivotal.offline import scenario_prompt
from emc.pivotal.prompts import PromptRecord

BATCH_SIZE = 32
SOURCE = "benchmark:logits-throughput"
ROLES = ("base", "adapted")
ORIGINAL_LOOP = Path(__file__).with_name("original_loop.py")
# The goals of issue 14, printed beside what was measured.
GOALS = {"original": 50.0, "load_once": 10.0}
HOW_CHOSEN = {
    "original": "what the original pipeline did, per prompt: load both models, one unbatched "
    "forward each, release them before the next load; in a process with only the original's "
    "imports, with the fastest unbatched forward, collecting garbage only if freeing needs it",
    "load_once": "the strongest honest alternative without batching: both models loaded once, "
    "then A's unbatched forward, one prompt and model at a time",
}

TopIds = dict[str, list[list[int]]]  # role -> per prompt, top-k ids in rank order


class TopKMismatch(BaseModel):
    prompt_id: str
    name: str
    role: str  # base | adapted
    way: str  # original | load_once: the baseline whose ids differ from EMC's
    emc: list[int]
    other: list[int]


class EmcTime(BaseModel):
    load_s: float  # both models, once
    score_s: float  # score_prompts over every prompt
    totals_s: list[float]  # every repeat; the split above is the median one's

    @computed_field
    @property
    def total_s(self) -> float:
        return self.load_s + self.score_s


class LoadOnceTime(BaseModel):
    load_s: float  # both models, once
    forward_s: float  # one unbatched forward per prompt and model, and its top-k
    totals_s: list[float]

    @computed_field
    @property
    def total_s(self) -> float:
        return self.load_s + self.forward_s


class OriginalTime(BaseModel):
    """Baseline A, summed over prompts."""

    load_s: float
    forward_s: float
    release_s: float  # before every load but the first
    totals_s: list[float]
    collects: bool  # releases run gc.collect(): dropping references alone did not free models
    gc_collect_s: float  # one gc.collect() in A's process, timed once for reference
    gc_objects: int  # objects the collector tracks in A's process...
    emc_gc_objects: int  # ...and in this one

    @computed_field
    @property
    def total_s(self) -> float:
        return self.load_s + self.forward_s + self.release_s


class ThroughputResult(BaseModel):
    recipe_hash: str
    prompts: int
    top_k: int
    batch_size: int
    repeats: int
    torch_threads: int
    emc: EmcTime
    original: OriginalTime  # baseline A
    load_once: LoadOnceTime  # baseline B
    how_chosen: dict[str, str]
    goals: dict[str, float]
    mismatches: list[TopKMismatch]

    @computed_field
    @property
    def ratio_vs_original(self) -> float:
        return self.original.total_s / self.emc.total_s

    @computed_field
    @property
    def ratio_vs_load_once(self) -> float:
        return self.load_once.total_s / self.emc.total_s

    @computed_field
    @property
    def limit_vs_original(self) -> float:
        """Where the ratio vs A tends as N grows: A's time per prompt over EMC's scoring's."""
        return self.original.total_s / self.emc.score_s

    @computed_field
    @property
    def limit_vs_load_once(self) -> float:
        """Where the ratio vs B tends as N grows: B's forwards over EMC's scoring."""
        return self.load_once.forward_s / self.emc.score_s

    @computed_field
    @property
    def goals_met(self) -> dict[str, bool]:
        return {
            "original": self.ratio_vs_original >= self.goals["original"],
            "load_once": self.ratio_vs_load_once >= self.goals["load_once"],
        }

    @computed_field
    @property
    def identical_top_k(self) -> bool:
        return not self.mismatches


def pivotal_prompts(lexicon: Lexicon, n: int) -> list[PromptRecord]:
    """The first n scenarios' chat prompts; repeats the lexicon when n exceeds it."""
    entries = islice(cycle(lexicon.entries), n)
    return [scenario_prompt(entry, SOURCE) for entry in entries]


def emc_way(
    config: ExperimentConfig, prompts: list[PromptRecord]
) -> tuple[tuple[float, float], TopIds]:
    started = time.perf_counter()
    base = load_replacement_model(config, "base")
    adapted = load_replacement_model(config, "adapted")
    loaded = time.perf_counter()
    scores = score_prompts(base, adapted, prompts, k=config.top_k, batch_size=BATCH_SIZE)
    scored = time.perf_counter()
    base.close()
    adapted.close()
    # Tokens are sorted by rank, so the top-k flags give the ids in rank order.
    top = {
        "base": [[t.token_id for t in s.base.top()] for s in scores],
        "adapted": [[t.token_id for t in s.adapted.top()] for s in scores],
    }
    return (loaded - started, scored - loaded), top


def load_once_way(
    config: ExperimentConfig, sequences: list[torch.Tensor]
) -> tuple[tuple[float, float], TopIds]:
    started = time.perf_counter()
    models = {role: load_replacement_model(config, role) for role in ROLES}
    loaded = time.perf_counter()
    top: TopIds = {role: [] for role in ROLES}
    for ids in sequences:
        for role, model in models.items():
            top[role].append(_top_ids(model, ids, config.top_k))
    scored = time.perf_counter()
    for model in models.values():
        model.close()
    return (loaded - started, scored - loaded), top


def _top_ids(loaded: LoadedModel, ids: torch.Tensor, k: int) -> list[int]:
    # The same forward as original_loop.top_ids: the wrapped HF module, one sequence.
    batch = ids[None].to(loaded.precision.device)
    with torch.inference_mode():
        logits = loaded.model._model(input_ids=batch).logits[0, -1].float()
    return logits.topk(k).indices.tolist()


def original_way(
    config: ExperimentConfig, sequences: list[torch.Tensor], threads: int, repeats: int
) -> tuple[OriginalTime, TopIds]:
    spec = _original_spec(config, sequences, threads, repeats)
    done = subprocess.run(
        [sys.executable, str(ORIGINAL_LOOP)],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{ORIGINAL_LOOP.name} failed:\n{done.stderr}")
    out = json.loads(done.stdout)
    totals = [r["load_s"] + r["forward_s"] + r["release_s"] for r in out["runs"]]
    median = out["runs"][_median_index(totals)]
    timing = OriginalTime(
        load_s=median["load_s"],
        forward_s=median["forward_s"],
        release_s=median["release_s"],
        totals_s=totals,
        collects=out["collects"],
        gc_collect_s=out["gc_collect_s"],
        gc_objects=median["gc_objects"],
        emc_gc_objects=len(gc.get_objects()),
    )
    return timing, median["top"]


def _original_spec(
    config: ExperimentConfig, sequences: list[torch.Tensor], threads: int, repeats: int
) -> dict:
    """Everything A's process needs, resolved here so that it needs no EMC code."""
    precision = resolve_precision(config.runtime)
    info = inspect_transcoders(config.models.transcoders.ref)
    return {
        "base_dir": str(resolve_model_dir(config.models.base.ref, config.models.base.revision)),
        "adapter_dir": str(resolve_adapter_dir(config)),
        "transcoders": {
            "paths": {str(layer): str(path) for layer, path in info.layer_paths.items()},
            "scan": info.scan,
            "input_hook": info.feature_input_hook,
            "output_hook": info.feature_output_hook,
            # As emc.models.transcoders.load_transcoders decides.
            "lazy_decoder": info.d_transcoder * info.d_model * info.n_layers > 50_000_000,
        },
        "dtype": str(precision.dtype).removeprefix("torch."),
        "device": str(precision.device),
        "threads": threads,
        "top_k": config.top_k,
        "repeats": repeats,
        "prompts": [ids.tolist() for ids in sequences],
    }


def _median_index(totals: list[float]) -> int:
    return totals.index(statistics.median_low(totals))


def run_benchmark(
    data_dir: Path, n_prompts: int, recipe: OrganismRecipe, threads: int, repeats: int = 1
) -> ThroughputResult:
    prepared = prepare_organism(data_dir, recipe)
    config = prepared.config
    if config.runtime.backend != "nnsight":  # A and B call the HF module nnsight wraps
        raise ValueError("the benchmark runs the nnsight backend (the organism's config)")
    prompts = pivotal_prompts(Lexicon.load(prepared.artifacts.lexicon), n_prompts)
    # Warm-up, untimed: imports, the first read of the weights and first-call costs of both
    # forward paths would otherwise be charged to whichever way runs first. It also gives the
    # token ids every way reads.
    warm = [load_replacement_model(config, role) for role in ROLES]
    sequences = [ids for _, ids in tokenize_prompts(prompts, warm[0].tokenizer)]
    score_prompts(*warm, prompts[:BATCH_SIZE], k=config.top_k, batch_size=BATCH_SIZE)
    _top_ids(warm[0], sequences[0], config.top_k)
    for model in warm:
        model.close()
    emc_runs, load_once_runs = [], []
    for repeat in range(repeats):
        _log(f"EMC, then baseline B: {n_prompts} prompts (run {repeat + 1} of {repeats})")
        emc_runs.append(emc_way(config, prompts))
        load_once_runs.append(load_once_way(config, sequences))
    _log(f"baseline A: {n_prompts} prompts, two model loads each, {repeats} run(s), subprocess")
    original, original_top = original_way(config, sequences, threads, repeats)
    emc_totals = [sum(split) for split, _ in emc_runs]
    (emc_load, emc_score), emc_top = emc_runs[_median_index(emc_totals)]
    b_totals = [sum(split) for split, _ in load_once_runs]
    (b_load, b_forward), load_once_top = load_once_runs[_median_index(b_totals)]
    mismatches = [
        TopKMismatch(prompt_id=p.prompt_id, name=p.name, role=role, way=way, emc=mine, other=theirs)
        for way, other_top in (("original", original_top), ("load_once", load_once_top))
        for role in ROLES
        for p, mine, theirs in zip(prompts, emc_top[role], other_top[role], strict=True)
        if mine != theirs
    ]
    return ThroughputResult(
        recipe_hash=recipe.recipe_hash(),
        prompts=n_prompts,
        top_k=config.top_k,
        batch_size=BATCH_SIZE,
        repeats=repeats,
        torch_threads=threads,
        emc=EmcTime(load_s=emc_load, score_s=emc_score, totals_s=emc_totals),
        original=original,
        load_once=LoadOnceTime(load_s=b_load, forward_s=b_forward, totals_s=b_totals),
        how_chosen=HOW_CHOSEN,
        goals=GOALS,
        mismatches=mismatches,
    )


def format_result(result: ThroughputResult) -> str:
    n = result.prompts
    a, b, e = result.original, result.load_once, result.emc
    rows = [
        (f"EMC: load once, batches of {result.batch_size}", e.total_s),
        ("A: original loop, reload per prompt", a.total_s),
        ("B: load once, one prompt at a time", b.total_s),
    ]
    release = (
        "gc.collect(), as dropping references did not free the models"
        if a.collects
        else "dropping references, which freed the models"
    )
    lines = [f"{'way':<40} {'seconds':>9} {'prompts/s':>10}"]
    lines += [f"{name:<40} {s:>9.3f} {n / s:>10.1f}" for name, s in rows]
    lines += [
        f"timed from each way's first load to its last top-k: loads included, the final release "
        f"not, warm-up untimed; median of {result.repeats} run(s); torch threads "
        f"{result.torch_threads}",
        f"EMC: load {e.load_s:.3f} s + score_prompts {e.score_s:.3f} s "
        f"({1000 * e.score_s / n:.1f} ms per prompt)",
        f"A: load {a.load_s:.2f} s + forward {a.forward_s:.2f} s + release {a.release_s:.2f} s "
        f"({1000 * a.total_s / n:.0f} ms per prompt); a release is {release}; one gc.collect() "
        f"took {a.gc_collect_s:.2f} s there ({a.gc_objects:,} objects tracked; "
        f"{a.emc_gc_objects:,} in EMC's process)",
        f"B: load {b.load_s:.3f} s + forward {b.forward_s:.3f} s "
        f"({1000 * b.forward_s / n:.1f} ms per prompt)",
        f"A is {result.how_chosen['original']}",
        f"B is {result.how_chosen['load_once']}",
        _ratio_line("A", result.ratio_vs_original, result.goals["original"]),
        _ratio_line("B", result.ratio_vs_load_once, result.goals["load_once"]),
        f"as N grows, the ratios tend to the time per prompt after loading: "
        f"{result.limit_vs_original:.0f}x vs A, {result.limit_vs_load_once:.1f}x vs B",
        f"top-{result.top_k} ids identical for all {n} prompts, both models, all three ways: "
        f"{'yes' if result.identical_top_k else 'NO'}",
    ]
    lines += [
        f"  mismatch {m.name} [{m.role}]: EMC {m.emc} vs {m.way} {m.other}"
        for m in result.mismatches
    ]
    return "\n".join(lines)


def _ratio_line(baseline: str, ratio: float, goal: float) -> str:
    verdict = "met" if ratio >= goal else "NOT met"
    return f"EMC vs {baseline}: {ratio:.1f}x (goal >= {goal:.0f}x: {verdict})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("emc-data"))
    parser.add_argument("--prompts", type=int, default=48, help="how many pivotal prompts")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each way; the median is reported"
    )
    parser.add_argument("--small", action="store_true", help="the seconds-long test organism")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads for every way (default: torch's own choice); 1 keeps "
        "timings stable on a machine other processes share",
    )
    args = parser.parse_args(argv)
    for name in ("prompts", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
    recipe = OrganismRecipe.small() if args.small else OrganismRecipe()
    threads = torch.get_num_threads()
    # Callers (tests) share this process, so the thread setting is put back afterwards.
    torch.set_num_threads(args.threads or threads)
    try:
        result = run_benchmark(
            args.data_dir, args.prompts, recipe, torch.get_num_threads(), args.repeats
        )
    finally:
        torch.set_num_threads(threads)
    figures = result.model_dump_json()
    if args.json:
        args.json.write_text(figures + "\n")
    print(format_result(result))
    print(figures)
    return 1 if result.mismatches else 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
