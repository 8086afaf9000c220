"""Feature cards: for each feature, what it fires on in a corpus and what its weights do.

`build_cards` runs one corpus pass for every feature asked (`emc.features.scan`) and reads the
feature's weights (`emc.features.directions`); the result is one `FeatureCard` per feature.
`parse_feature` and `check_features` turn what a person typed into features the transcoders have.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from emc.features.corpus import TokenizedCorpus
from emc.features.directions import decoder_logit_effects, encoder_top_tokens, logit_basis
from emc.features.records import Feature, FeatureCard
from emc.features.scan import scan_corpus
from emc.models import LoadedModel

_SPEC = re.compile(r"^\s*L?(\d+)\s*/\s*(\d+)\s*$")


def parse_feature(text: str) -> Feature:
    """`"1/397"` (or `L1/397`) -> (1, 397); a ValueError naming the text otherwise."""
    match = _SPEC.match(text)
    if not match:
        raise ValueError(f"cannot read feature {text.strip()!r}: write LAYER/FEATURE, e.g. 1/397")
    return int(match.group(1)), int(match.group(2))


def check_features(features: Sequence[Feature], widths: Sequence[int]) -> None:
    """Refuse features the transcoders do not have (`widths`: features per layer), naming both."""
    wrong = [
        f"{layer}/{feature}"
        for layer, feature in features
        if not (0 <= layer < len(widths) and 0 <= feature < widths[layer])
    ]
    if wrong:
        sizes = (
            f"{len(widths)} layers of {widths[0]} features"
            if len(set(widths)) == 1
            else f"{len(widths)} layers of {', '.join(map(str, widths))} features"
        )
        raise ValueError(f"no such feature: {', '.join(wrong)} (the transcoders have {sizes})")


def build_cards(
    loaded: LoadedModel,
    corpus: TokenizedCorpus,
    features: Sequence[Feature],
    top_k: int = 10,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> list[FeatureCard]:
    """One card per feature (sorted by layer, feature), from one pass over `corpus`."""
    scans = scan_corpus(loaded, corpus, features, top_k, batch_size, progress=progress)
    chosen = list(scans)
    logits = decoder_logit_effects(loaded, chosen)
    encoders = encoder_top_tokens(loaded, chosen)
    basis = logit_basis(loaded)
    return [
        FeatureCard(
            layer=layer,
            feature=feature,
            model_id=loaded.identity.model_id,
            corpus_id=corpus.corpus_id,
            corpus_name=corpus.name,
            stats=scans[(layer, feature)].stats,
            examples=scans[(layer, feature)].examples,
            top_logits=logits[(layer, feature)][0],
            bottom_logits=logits[(layer, feature)][1],
            encoder_tokens=encoders[(layer, feature)],
            logit_basis=basis,
            dtype=loaded.precision.dtype_name,
        )
        for layer, feature in chosen
    ]
