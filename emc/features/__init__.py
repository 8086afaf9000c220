"""Feature cards: what a transcoder feature *is*. Its top-activating contexts in a corpus, how its
activation is distributed, the tokens its decoder promotes and suppresses, and the tokens that
excite its encoder. Pure functions of a loaded model and a corpus; no store, no flow.

Names are imported on first use: `emc feature --help` (and every other command, which the CLI
registers at startup) must not pay for torch and transformers.
"""

from importlib import import_module
from typing import TYPE_CHECKING

_WHERE = {
    "build_cards": "cards",
    "check_features": "cards",
    "parse_feature": "cards",
    "DEFAULT_LIMIT": "corpus",
    "DEFAULT_MAX_TOKENS": "corpus",
    "Corpus": "corpus",
    "CorpusError": "corpus",
    "CorpusText": "corpus",
    "TokenizedCorpus": "corpus",
    "organism_corpus": "corpus",
    "organism_root_of": "corpus",
    "read_corpus_file": "corpus",
    "select_texts": "corpus",
    "store_corpus": "corpus",
    "tokenize_corpus": "corpus",
    "decoder_logit_effects": "directions",
    "encoder_top_tokens": "directions",
    "ActivationStats": "records",
    "DeltaInfo": "records",
    "Feature": "records",
    "FeatureCard": "records",
    "FeatureContext": "records",
    "FeatureExample": "records",
    "LoraInfo": "records",
    "RankInfo": "records",
    "TokenValue": "records",
    "FeatureScan": "scan",
    "StreamingHistogram": "scan",
    "batch_activations": "scan",
    "scan_corpus": "scan",
}

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_MAX_TOKENS",
    "ActivationStats",
    "Corpus",
    "CorpusError",
    "CorpusText",
    "DeltaInfo",
    "Feature",
    "FeatureCard",
    "FeatureContext",
    "FeatureExample",
    "FeatureScan",
    "LoraInfo",
    "RankInfo",
    "StreamingHistogram",
    "TokenValue",
    "TokenizedCorpus",
    "batch_activations",
    "build_cards",
    "check_features",
    "decoder_logit_effects",
    "encoder_top_tokens",
    "organism_corpus",
    "organism_root_of",
    "parse_feature",
    "read_corpus_file",
    "scan_corpus",
    "select_texts",
    "store_corpus",
    "tokenize_corpus",
]

if TYPE_CHECKING:
    from emc.features.cards import build_cards, check_features, parse_feature
    from emc.features.corpus import (
        DEFAULT_LIMIT,
        DEFAULT_MAX_TOKENS,
        Corpus,
        CorpusError,
        CorpusText,
        TokenizedCorpus,
        organism_corpus,
        organism_root_of,
        read_corpus_file,
        select_texts,
        store_corpus,
        tokenize_corpus,
    )
    from emc.features.directions import decoder_logit_effects, encoder_top_tokens
    from emc.features.records import (
        ActivationStats,
        DeltaInfo,
        Feature,
        FeatureCard,
        FeatureContext,
        FeatureExample,
        LoraInfo,
        RankInfo,
        TokenValue,
    )
    from emc.features.scan import FeatureScan, StreamingHistogram, batch_activations, scan_corpus


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'emc.features' has no attribute {name!r}")
    value = getattr(import_module(f"emc.features.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
