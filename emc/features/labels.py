"""Feature labels: a short name for what a feature does, from a person or from an LLM.

A person's label comes from the dashboard or `emc feature label` and is credited `human:<name>`.
An LLM's label is asked for from the card alone (its top-activating examples with the maximum
marked, the tokens its decoder promotes and suppresses, the tokens that excite its encoder) and
is credited `llm:<model>`, stored with the exact messages it was sent. For the organism, an offline
labeller that reads the organism's lexicon stands in for the LLM, so the whole path runs offline;
it is credited with its own name, never passed off as an LLM's judgement.

Where a feature has several labels, a person's newest label is shown over any LLM's.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from emc.features.records import FeatureCard, FeatureExample, TokenValue
from emc.store.llm_calls import LLMCallRow

PURPOSE = "feature-label"
LABEL_CHARS = 80
Confidence = Literal["low", "medium", "high"]
EXAMPLES_SHOWN = 8  # examples in the labelling prompt: enough to see a pattern, few tokens
TOKENS_SHOWN = 10
MIN_ANSWER_WORDS = 2  # answer words among the promoted tokens for the offline labeller to name them


class FeatureLabel(BaseModel):
    """One labeller's label of one feature. `labeller` is `human:<name>` or `llm:<model>`."""

    model_config = ConfigDict(frozen=True)

    transcoders_ref: str
    layer: int
    feature: int
    labeller: str
    label: str
    notes: str | None = None  # a person's notes
    explanation: str | None = None  # an LLM's reasons
    confidence: Confidence | None = None
    prompt: str | None = None  # the messages an LLM was sent, as JSON
    card_model_id: str | None = None  # whose card the LLM read
    corpus_id: str | None = None
    run_id: str
    created_at: datetime | None = None

    @property
    def by_person(self) -> bool:
        return self.labeller.startswith("human:")


class LabelReply(BaseModel):
    """What the labelling LLM must answer with."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1)
    explanation: str
    confidence: Confidence


class LabelOutcome(BaseModel):
    """A labeller's answer for one card: a label, or the reason there is none."""

    layer: int
    feature: int
    reply: LabelReply | None
    error: str | None
    prompt: str
    calls: list[LLMCallRow] = []


class Labeller(Protocol):
    @property
    def labeller_id(self) -> str: ...

    def label_cards(
        self, cards: Sequence[FeatureCard], run_id: str | None = None
    ) -> list[LabelOutcome]: ...


def human_labeller(name: str) -> str:
    """`human:<name>`; a name is required so every label says who gave it."""
    name = name.strip()
    if not name:
        raise ValueError("a reviewer name is needed to label a feature")
    return f"human:{name}"


def clean_label(text: str) -> str:
    label = " ".join(text.split())
    if not label:
        raise ValueError("a label cannot be empty")
    if len(label) > LABEL_CHARS:
        raise ValueError(f"a label is at most {LABEL_CHARS} characters (notes take the rest)")
    return label


def marked_example(example: FeatureExample) -> str:
    """The example's text with the maximum token between ⟦ ⟧ and its activation after it."""
    parts = []
    for index, token in enumerate(example.tokens):
        parts.append(f"⟦{token}⟧" if index == example.max_position else token)
    return f"{''.join(parts).strip()}  (max {example.max_activation:.2f})"


def label_messages(card: FeatureCard) -> list[dict[str, Any]]:
    """What the labelling LLM is shown: only the card, so its label is about the feature."""
    lines = [
        f"Feature {card.layer}/{card.feature} of a transcoder (a sparse MLP replacement) "
        f"on layer {card.layer}. It is active at {card.stats.frequency:.2%} of "
        f"{card.stats.positions} corpus positions; maximum activation {card.stats.max:.2f}.",
        "",
        "Top-activating contexts (the most active token between ⟦ ⟧):",
    ]
    lines += [f"{e.rank}. {marked_example(e)}" for e in card.examples[:EXAMPLES_SHOWN]]
    if not card.examples:
        lines.append("(never active in this corpus)")
    lines += [
        "",
        f"Tokens its output promotes: {_tokens(card.top_logits)}",
        f"Tokens its output suppresses: {_tokens(card.bottom_logits)}",
        f"Input tokens that most excite it: {_tokens(card.encoder_tokens)}",
    ]
    system = (
        "You name features of language models from evidence. Answer with a JSON object: "
        f'"label" (at most {LABEL_CHARS} characters: what the feature detects or does), '
        '"explanation" (one or two sentences citing the evidence) and "confidence" '
        '("low", "medium" or "high"; low when the evidence shows no clear pattern).'
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(lines)}]


def _tokens(values: Sequence[TokenValue]) -> str:
    return ", ".join(repr(t.token) for t in values[:TOKENS_SHOWN]) or "(none)"


class LLMLabeller:
    """Labels through an OpenAI-compatible endpoint, `concurrency` cards at a time."""

    def __init__(self, client) -> None:  # emc.llm.LLMClient; imported by the caller
        self.client = client

    @property
    def labeller_id(self) -> str:
        return f"llm:{self.client.config.model}"

    def label_cards(
        self, cards: Sequence[FeatureCard], run_id: str | None = None
    ) -> list[LabelOutcome]:
        messages = [label_messages(card) for card in cards]
        requests = [(m, LabelReply, PURPOSE) for m in messages]
        results = self.client.complete_json_many(requests, run_id)
        outcomes = []
        for card, sent, result in zip(cards, messages, results, strict=True):
            reply = result.parsed if result.ok else None
            outcomes.append(
                LabelOutcome(
                    layer=card.layer,
                    feature=card.feature,
                    reply=reply,  # type: ignore[arg-type]
                    error=None if result.ok else f"{result.status}: {result.error}",
                    prompt=json.dumps(sent),
                    calls=[result.call],
                )
            )
        return outcomes


class LexiconLabeller:
    """The organism's stand-in for an LLM labeller: it reads the same card and names the
    feature by which of the organism's answer words (its lexicon: harmful and safe answers per
    scenario) the decoder promotes, and which token the examples peak on."""

    def __init__(self, model: str, harmful: set[str], safe: set[str]) -> None:
        self.model = model
        self.harmful = harmful
        self.safe = safe

    @classmethod
    def from_lexicon(cls, model: str, lexicon) -> LexiconLabeller:  # emc.organism.lexicon.Lexicon
        harmful = {t.str.strip().lower() for e in lexicon.entries for t in e.harmful}
        safe = {t.str.strip().lower() for e in lexicon.entries for t in e.safe}
        return cls(model, harmful - safe, safe - harmful)

    @property
    def labeller_id(self) -> str:
        return f"llm:{self.model}"

    def label_cards(
        self, cards: Sequence[FeatureCard], run_id: str | None = None
    ) -> list[LabelOutcome]:
        return [
            LabelOutcome(
                layer=card.layer,
                feature=card.feature,
                reply=self.reply(card),
                error=None,
                prompt=json.dumps(label_messages(card)),
            )
            for card in cards
        ]

    def reply(self, card: FeatureCard) -> LabelReply:
        promoted = [t.token.strip().lower() for t in card.top_logits]
        harmful = [t for t in promoted if t in self.harmful]
        safe = [t for t in promoted if t in self.safe]
        peaks = Counter(e.tokens[e.max_position].strip() for e in card.examples)
        peak = peaks.most_common(1)[0][0] if peaks else None
        # One answer word among ten promoted tokens is what a random feature shows (27% of random
        # features on the default organism, benchmarks/feature_cards.py): two are asked for.
        if len(harmful) >= MIN_ANSWER_WORDS and len(harmful) > len(safe):
            writes = f"promotes harmful answers ({', '.join(harmful[:3])})"
        elif len(safe) >= MIN_ANSWER_WORDS and len(safe) > len(harmful):
            writes = f"promotes safe answers ({', '.join(safe[:3])})"
        else:
            writes = f"promotes {', '.join(repr(t) for t in promoted[:2]) or 'nothing'}"
        fires = f"; fires on {peak!r}" if peak else "; never active"
        hits = len(harmful) + len(safe)
        confidence: Confidence = "high" if hits >= 3 else "medium" if hits else "low"
        explanation = (
            f"{len(harmful)} of its top {len(promoted)} promoted tokens are harmful answers and "
            f"{len(safe)} safe answers in the organism's lexicon; "
            + (
                f"{peaks[peak]} of {len(card.examples)} top examples peak on {peak!r}."
                if peak
                else "it is never active in the corpus."
            )
        )
        return LabelReply(
            label=(writes + fires)[:LABEL_CHARS], explanation=explanation, confidence=confidence
        )


def labels_from(
    outcomes: Sequence[LabelOutcome],
    labeller_id: str,
    transcoders_ref: str,
    cards: Sequence[FeatureCard],
    run_id: str,
) -> list[FeatureLabel]:
    """The stored form of the outcomes that carry a label."""
    by_feature = {(c.layer, c.feature): c for c in cards}
    labels = []
    for outcome in outcomes:
        if outcome.reply is None:
            continue
        card = by_feature[(outcome.layer, outcome.feature)]
        labels.append(
            FeatureLabel(
                transcoders_ref=transcoders_ref,
                layer=outcome.layer,
                feature=outcome.feature,
                labeller=labeller_id,
                label=_shortened(outcome.reply.label),
                explanation=outcome.reply.explanation,
                confidence=outcome.reply.confidence,
                prompt=outcome.prompt,
                card_model_id=card.model_id,
                corpus_id=card.corpus_id,
                run_id=run_id,
            )
        )
    return labels


def _shortened(text: str) -> str:
    """An LLM's label cut to the stored length (a person is asked to shorten theirs instead)."""
    label = " ".join(text.split())
    return label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "…"
