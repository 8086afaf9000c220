"""Logits throughput: EMC's batched scoring vs the original pipeline's reload-per-prompt.

Run as `python benchmarks/logits_throughput.py [--data-dir D] [--prompts N] [--small]
[--threads T] [--json PATH]`.

Both ways run in the same process on the same organism and prompts:

- EMC: load the base and adapted replacement models once, `score_prompts` over every prompt in
  batches of 32.
- original: for every prompt, load both replacement models from scratch, run circuit-tracer's
  own forward pass on that one prompt, then close them.

The original way also serves as the reference for correctness: both ways must give the same
top-k token ids (in rank order) for every prompt and both models. The process exits 1 if any
differ. The figures go to stdout's last line as JSON, and to `--json PATH` if given.
"""

from __future__ import annotations

import argparse
import sys
import time
from itertools import cycle, islice
from pathlib import Path

import torch
from pydantic import BaseModel, computed_field

from emc.config import ExperimentConfig
from emc.models import LoadedModel, load_replacement_model
from emc.organism import Lexicon, OrganismRecipe
from emc.organism.experiment import prepare_organism
from emc.pivotal.logits import score_prompts
from emc.pivotal.offline import scenario_prompt
from emc.pivotal.prompts import PromptRecord, render_prompt

BATCH_SIZE = 32
SOURCE = "benchmark:logits-throughput"


class TopKMismatch(BaseModel):
    prompt_id: str
    name: str
    role: str  # base | adapted
    emc: list[int]
    original: list[int]


class OriginalSplit(BaseModel):
    """Where the reload-per-prompt time goes, summed over prompts."""

    load_s: float
    forward_s: float
    close_s: float  # LoadedModel.close: mostly its gc.collect()

    @computed_field
    @property
    def total_s(self) -> float:
        return self.load_s + self.forward_s + self.close_s


class ThroughputResult(BaseModel):
    recipe_hash: str
    prompts: int
    top_k: int
    batch_size: int
    torch_threads: int
    emc_load_s: float  # both models, once
    emc_score_s: float  # score_prompts over every prompt
    original: OriginalSplit  # every prompt: load both, forward, close
    mismatches: list[TopKMismatch]

    @computed_field
    @property
    def emc_s(self) -> float:
        return self.emc_load_s + self.emc_score_s

    @computed_field
    @property
    def original_s(self) -> float:
        return self.original.total_s

    @computed_field
    @property
    def emc_prompts_per_s(self) -> float:
        return self.prompts / self.emc_s

    @computed_field
    @property
    def original_prompts_per_s(self) -> float:
        return self.prompts / self.original_s

    @computed_field
    @property
    def ratio(self) -> float:
        return self.emc_prompts_per_s / self.original_prompts_per_s

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
) -> tuple[float, float, dict[str, list[list[int]]]]:
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
    return loaded - started, scored - loaded, top


def original_way(
    config: ExperimentConfig, prompts: list[PromptRecord]
) -> tuple[OriginalSplit, dict[str, list[list[int]]]]:
    top: dict[str, list[list[int]]] = {"base": [], "adapted": []}
    load_s = forward_s = close_s = 0.0
    for prompt in prompts:
        started = time.perf_counter()
        models = {role: load_replacement_model(config, role) for role in ("base", "adapted")}
        loaded = time.perf_counter()
        ids = models["base"].encode(render_prompt(prompt, models["base"].tokenizer))
        for role, model in models.items():
            top[role].append(_top_ids(model, ids, config.top_k))
        scored = time.perf_counter()
        for model in models.values():
            model.close()
        closed = time.perf_counter()
        load_s += loaded - started
        forward_s += scored - loaded
        close_s += closed - scored
    return OriginalSplit(load_s=load_s, forward_s=forward_s, close_s=close_s), top


def _top_ids(model: LoadedModel, ids: torch.Tensor, k: int) -> list[int]:
    # circuit-tracer's own unbatched forward, as the original pipeline scored a prompt.
    logits = model.next_token_logits(ids)[-1]
    return logits.topk(k).indices.tolist()


def run_benchmark(data_dir: Path, n_prompts: int, recipe: OrganismRecipe) -> ThroughputResult:
    prepared = prepare_organism(data_dir, recipe)
    config = prepared.config
    prompts = pivotal_prompts(Lexicon.load(prepared.artifacts.lexicon), n_prompts)
    # Warm-up, untimed: imports and the first read of the weights would otherwise be charged to
    # whichever way runs first.
    load_replacement_model(config, "adapted").close()
    _log(f"EMC way: {n_prompts} prompts, batch size {BATCH_SIZE}")
    emc_load_s, emc_score_s, emc_top = emc_way(config, prompts)
    _log(f"original way: {n_prompts} prompts, two model loads each")
    original, original_top = original_way(config, prompts)
    mismatches = [
        TopKMismatch(prompt_id=p.prompt_id, name=p.name, role=role, emc=mine, original=theirs)
        for role in ("base", "adapted")
        for p, mine, theirs in zip(prompts, emc_top[role], original_top[role], strict=True)
        if mine != theirs
    ]
    return ThroughputResult(
        recipe_hash=recipe.recipe_hash(),
        prompts=n_prompts,
        top_k=config.top_k,
        batch_size=BATCH_SIZE,
        torch_threads=torch.get_num_threads(),
        emc_load_s=emc_load_s,
        emc_score_s=emc_score_s,
        original=original,
        mismatches=mismatches,
    )


def format_result(result: ThroughputResult) -> str:
    rows = [
        ("way", "seconds", "prompts/s"),
        (f"EMC (load once, batch {result.batch_size})", result.emc_s, result.emc_prompts_per_s),
        ("original (reload per prompt)", result.original_s, result.original_prompts_per_s),
    ]
    lines = [f"{a:<34} {b:>9} {c:>10}" for a, b, c in rows[:1]]
    lines += [f"{a:<34} {b:>9.2f} {c:>10.2f}" for a, b, c in rows[1:]]
    lines += [
        f"torch threads: {result.torch_threads}",
        f"EMC split: load {result.emc_load_s:.2f} s, score {result.emc_score_s:.3f} s",
        f"original split: load {result.original.load_s:.2f} s, forward "
        f"{result.original.forward_s:.2f} s, close {result.original.close_s:.2f} s",
        f"ratio: {result.ratio:.1f}x  (target >= 50x)",
        f"top-{result.top_k} ids identical for all {result.prompts} prompts: "
        f"{'yes' if result.identical_top_k else 'NO'}",
    ]
    lines += [
        f"  mismatch {m.name} [{m.role}]: EMC {m.emc} vs original {m.original}"
        for m in result.mismatches
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("emc-data"))
    parser.add_argument("--prompts", type=int, default=48, help="how many pivotal prompts")
    parser.add_argument("--small", action="store_true", help="the seconds-long test organism")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's own choice); 1 keeps timings stable on a "
        "machine other processes share",
    )
    args = parser.parse_args(argv)
    if args.prompts < 1:
        parser.error("--prompts must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    recipe = OrganismRecipe.small() if args.small else OrganismRecipe()
    threads = torch.get_num_threads()
    # Callers (tests) share this process, so the thread setting is put back afterwards.
    torch.set_num_threads(args.threads or threads)
    try:
        result = run_benchmark(args.data_dir, args.prompts, recipe)
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
