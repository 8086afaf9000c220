"""What a feature card holds: the records the card computation returns and the store keeps.

A card has two halves. What the model and a corpus say about the feature (top-activating
examples, activation statistics, decoder logit effects, encoder input tokens) is computed once per
model and corpus and stored (`feature_cards`, `feature_examples`). What the rest of the store
says about it (activation change base -> adapted, LoRA alignment, ranks in the rankings) changes
whenever analysis runs again, so it is read fresh when a card is shown (`FeatureContext`), never
copied into the card.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

Feature = tuple[int, int]  # (layer, feature index)
CorpusKind = Literal["organism", "file", "store"]


class TokenValue(BaseModel):
    """One vocabulary token and a value: a logit effect or an encoder pre-activation."""

    model_config = ConfigDict(frozen=True)

    token_id: int
    token: str
    value: float


class ActivationStats(BaseModel):
    """How the feature fires over every position of the corpus (BOS and padding left out).

    Quantiles and the histogram are of the *active* positions (activation > 0): a sparse feature
    is 0 almost everywhere, and quantiles over all positions would be zeros. `frequency` says how
    many positions that is. The quantiles are circuit-tracer's percentiles 1..100, so the viewer
    can place an activation among them; the histogram spans [0, max] in equal bins.
    """

    model_config = ConfigDict(frozen=True)

    texts: int
    positions: int
    active: int
    frequency: float  # active / positions
    max: float
    mean_active: float | None  # None when never active
    quantile_levels: list[float]
    quantile_values: list[float]
    hist_edges: list[float]  # len(hist_counts) + 1
    hist_counts: list[int]


class FeatureExample(BaseModel):
    """One of the feature's top-activating contexts: a window of one corpus text around the
    position where the feature is most active in it."""

    model_config = ConfigDict(frozen=True)

    rank: int  # 1 = the highest max activation over the corpus
    source: str  # where the text came from: file and line, prompt id, generation id
    text: str  # the window, decoded
    token_ids: list[int]
    tokens: list[str]  # one per token id, decoded on its own
    activations: list[float]  # the feature's activation at each token of the window
    max_position: int  # index into the window of the maximum
    max_activation: float
    start: int  # the window's first position in the tokenised text (0 = BOS)


class FeatureCard(BaseModel):
    """What the model and a corpus say about one transcoder feature."""

    model_config = ConfigDict(frozen=True)

    layer: int
    feature: int
    model_id: str
    corpus_id: str
    corpus_name: str
    stats: ActivationStats
    examples: list[FeatureExample]
    top_logits: list[TokenValue]  # decoder direction through the unembedding: largest first
    bottom_logits: list[TokenValue]  # most negative first
    encoder_tokens: list[TokenValue]  # token embeddings that most excite the encoder
    logit_basis: str  # what the logit effects went through (see emc.features.directions)
    dtype: str
    run_id: str | None = None
    created_at: datetime | None = None


class DeltaInfo(BaseModel):
    """The feature's activation change base -> adapted over the analysed prompts."""

    model_config = ConfigDict(frozen=True)

    rank: int  # by mean |delta|, 1 = moved most
    ranked: int  # features with a stored delta
    mean_delta: float  # adapted - base, summed over positions, mean over measured prompts
    mean_abs_delta: float
    prompts: int  # prompts where it is among the stored largest deltas
    measured: int  # prompts measured


class LoraInfo(BaseModel):
    """The adapter direction this feature aligns with best (highest chance percentile)."""

    model_config = ConfigDict(frozen=True)

    module: str
    direction: int
    compared_with: str  # encoder | decoder
    cosine: float
    null_percentile: float  # against random directions of the same dimension


class RankInfo(BaseModel):
    """The feature's place in one ranking (`emc.store.features.feature_ranking`)."""

    model_config = ConfigDict(frozen=True)

    role: str
    metric: str
    sign: str
    rank: int | None  # None: not in this ranking
    ranked: int
    mean: float | None


class FeatureContext(BaseModel):
    """What the rest of the store says about a feature, read when its card is shown."""

    model_config = ConfigDict(frozen=True)

    layer: int
    feature: int
    delta: DeltaInfo | None  # None: not among the stored deltas (or no analysis yet)
    lora: LoraInfo | None  # None: not among any comparison's top-aligned features
    ranks: list[RankInfo]
