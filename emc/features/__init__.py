"""Feature cards: what a transcoder feature *is*. Its top-activating contexts in a corpus, how its
activation is distributed, the tokens its decoder promotes and suppresses, and the tokens that
excite its encoder. Pure functions of a loaded model and a corpus; no store, no flow.
"""

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
