"""Feature cards on a demo store: what they cost, and whether they tell the ranked features from
random ones.

The adapted model's top `--top` evil-pushing features (`emc analyze`'s ranking) are carded and
labelled by the organism's offline labeller next to as many random features drawn from the same
layers (a matched control: same layers, never in the top). Printed per group: how many of the
decoder's top 10 promoted tokens are the organism's harmful answers and how many safe ones, the
share labelled "promotes harmful answers", and the share never active in the corpus. A ranking
that finds harm-writing features shows more harmful tokens for the top than for the control; a
labeller that calls random features harmful shows up in the control's share (its false-positive
rate). Then the cost: one corpus pass for all of them, in features per second.

    python benchmarks/feature_cards.py --data-dir emc-data [--top 30] [--limit-texts 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from emc.config import load_experiment
from emc.features import build_cards
from emc.features.labels import LexiconLabeller
from emc.models import load_replacement_model
from emc.models.transcoders import inspect_transcoders
from emc.organism import Lexicon
from emc.store import Store
from emc.store.features import feature_ranking
from flows.feature_cards import corpus_for


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("emc-data"))
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--limit-texts", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    config, data_dir = load_experiment(None, args.data_dir)
    store = Store.in_data_dir(data_dir)
    ranking = feature_ranking(store, role="adapted", sign="evil", top=args.top)
    if ranking.empty or not config.ground_truth:
        sys.exit(f"no ranking in {data_dir} or no organism: run `emc demo -d {data_dir}` first")
    top = [(int(r.layer), int(r.feature)) for r in ranking.itertuples()]
    width = inspect_transcoders(config.models.transcoders.ref).d_transcoder
    control = matched_random(top, width, random.Random(args.seed))
    labeller = LexiconLabeller.from_lexicon(
        "organism-lexicon", Lexicon.load(Path(config.ground_truth))
    )

    corpus = corpus_for(config, store, None, args.limit_texts)
    loaded = load_replacement_model(config, "adapted")
    try:
        start = time.perf_counter()
        cards = {(c.layer, c.feature): c for c in build_cards(loaded, corpus, top + control)}
        seconds = time.perf_counter() - start
    finally:
        loaded.close()
    figures = {
        "features": len(cards),
        "texts": len(corpus.token_ids),
        "tokens": corpus.tokens,
        "seconds": round(seconds, 2),
        "features_per_second": round(len(cards) / seconds, 1),
        "top": group_figures([cards[f] for f in top], labeller),
        "random_same_layers": group_figures([cards[f] for f in control], labeller),
    }
    print(f"{len(cards)} cards over {figures['texts']} texts ({figures['tokens']} tokens) in "
          f"{seconds:.1f} s: {figures['features_per_second']} features/s")  # fmt: skip
    print(f"{'group':<20}{'harmful in top 10':>18}{'safe in top 10':>16}"
          f"{'labelled harmful':>18}{'never active':>14}")  # fmt: skip
    for name in ("top", "random_same_layers"):
        g = figures[name]
        print(f"{name:<20}{g['harmful_tokens']:>18.2f}{g['safe_tokens']:>16.2f}"
              f"{g['labelled_harmful']:>18.0%}{g['never_active']:>14.0%}")  # fmt: skip
    line = json.dumps(figures)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")
    return figures


def matched_random(top: list[tuple[int, int]], width: int, rng: random.Random):
    """For each top feature, a random feature of the same layer that is not in the top."""
    taken = set(top)
    control = []
    for layer, _ in top:
        while (choice := (layer, rng.randrange(width))) in taken:
            pass
        taken.add(choice)
        control.append(choice)
    return control


def group_figures(cards, labeller: LexiconLabeller) -> dict:
    """Mean harmful and safe answer tokens among the top 10 promoted, and label shares."""
    harmful = safe = labelled = silent = 0
    for card in cards:
        promoted = [t.token.strip().lower() for t in card.top_logits[:10]]
        harmful += sum(t in labeller.harmful for t in promoted)
        safe += sum(t in labeller.safe for t in promoted)
        labelled += labeller.reply(card).label.startswith("promotes harmful")
        silent += not card.examples
    n = max(len(cards), 1)
    return {
        "n": len(cards),
        "harmful_tokens": harmful / n,
        "safe_tokens": safe / n,
        "labelled_harmful": labelled / n,
        "never_active": silent / n,
    }


if __name__ == "__main__":
    main()
