"""One pass over a corpus for many features at once: top-activating contexts and activation
statistics, in memory bounded by the number of features, never by the corpus.

Activations are read as circuit-tracer computes them (the transcoder's encoder on each layer's
MLP input, BOS zeroed), in right-padded batches: in a causal model the padding after a text
never reaches its positions, so each text's activations equal its own forward pass up to float
rounding. BOS and padding positions are left out of every statistic.

Statistics are streamed. Each feature's active values (activation > 0) go into a histogram of
`FINE_BINS` equal bins over [0, width * FINE_BINS); when a value reaches the top, the bins are
merged in pairs and the width doubles, which keeps every count exact. So one pass gives the
exact count, maximum and mean, the quantiles to within one fine bin (at most 2 * max / 1024),
and the card's histogram over [0, max] (fine bins put into the coarse bin holding their centre).
A second pass over the corpus would be needed for exact quantiles; a bin is far below what a
reader of a card can see.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from emc.analysis.hooks import feature_hooks, removing
from emc.features.corpus import TokenizedCorpus
from emc.features.directions import token_decoder
from emc.features.records import ActivationStats, Feature, FeatureExample
from emc.models import LoadedModel, finite_guard

FINE_BINS = 1024
HIST_BINS = 50
QUANTILE_LEVELS = tuple(i / 100 for i in range(1, 101))  # circuit-tracer's percentiles
WINDOW = (32, 8)  # tokens kept before and after an example's maximum


@dataclass(frozen=True)
class FeatureScan:
    stats: ActivationStats
    examples: list[FeatureExample]


class StreamingHistogram:
    """Per-feature histograms of positive values with exact counts and doubling bin widths."""

    def __init__(self, n_features: int, bins: int = FINE_BINS) -> None:
        if bins < 2 or bins % 2:
            raise ValueError(f"bins must be even and at least 2, got {bins}")
        self.bins = bins
        self.counts = torch.zeros(n_features, bins, dtype=torch.int64)
        self.width = torch.zeros(n_features, dtype=torch.float64)  # 0: nothing seen yet

    def add(self, values: torch.Tensor) -> None:
        """`values`: (n, n_features); only positive entries count."""
        if values.numel() == 0:
            return
        values = values.double()
        top = values.max(dim=0).values
        fresh = (self.width == 0) & (top > 0)
        # A power of two above top / bins: the first values fit, and doublings stay exact.
        self.width[fresh] = torch.exp2(torch.floor(torch.log2(top[fresh] / self.bins)) + 1)
        while True:
            grow = (self.width > 0) & (top >= self.width * self.bins)
            if not grow.any():
                break
            merged = self.counts[grow].view(-1, self.bins // 2, 2).sum(-1)
            self.counts[grow] = torch.cat([merged, torch.zeros_like(merged)], dim=1)
            self.width[grow] *= 2
        rows, cols = (values > 0).nonzero(as_tuple=True)
        if len(rows) == 0:
            return
        index = (values[rows, cols] / self.width[cols]).floor().long().clamp(0, self.bins - 1)
        flat = cols * self.bins + index
        self.counts += torch.bincount(flat, minlength=self.counts.numel()).view_as(self.counts)

    def quantiles(self, levels: Sequence[float], maxima: torch.Tensor) -> torch.Tensor:
        """(n_features, len(levels)): linear within the fine bin, never above the maximum."""
        cumulative = self.counts.cumsum(dim=1).double()
        total = cumulative[:, -1:]
        targets = torch.tensor(levels, dtype=torch.float64)[None, :] * total
        index = torch.searchsorted(cumulative, targets).clamp(max=self.bins - 1)
        before = torch.where(
            index > 0, cumulative.gather(1, (index - 1).clamp(min=0)), torch.zeros_like(targets)
        )
        inside = self.counts.gather(1, index).double().clamp(min=1)
        position = index.double() + ((targets - before) / inside).clamp(0, 1)
        values = position * self.width[:, None]
        values = torch.minimum(values, maxima.double()[:, None])
        return torch.where(total > 0, values, torch.zeros_like(values))

    def coarse(self, maxima: torch.Tensor, bins: int = HIST_BINS) -> torch.Tensor:
        """(n_features, bins) counts over [0, max] of each feature."""
        centres = torch.arange(self.bins, dtype=torch.float64) + 0.5
        centres = centres[None, :] * self.width[:, None]
        size = (maxima.double() / bins).clamp(min=1e-300)[:, None]
        index = (centres / size).floor().long().clamp(0, bins - 1)
        out = torch.zeros(len(self.counts), bins, dtype=torch.int64)
        return out.scatter_add_(1, index, self.counts)


class TopContexts:
    """Per feature, the `k` texts where it is most active (one entry per text: its maximum),
    with the feature's activation at every position of those texts."""

    def __init__(self, n_features: int, k: int) -> None:
        self.k = k
        self.values = torch.full((k, n_features), -math.inf)
        self.texts = torch.full((k, n_features), -1, dtype=torch.long)
        self.positions = torch.zeros((k, n_features), dtype=torch.long)
        self.kept: dict[tuple[int, int], torch.Tensor] = {}  # (column, text) -> activations

    def add(self, text_ids: Sequence[int], acts: torch.Tensor, lengths: Sequence[int]) -> None:
        """`acts`: (n_texts, n_pos, n_features), zero at padding; `text_ids`: global indices."""
        best, where = acts.max(dim=1)
        ids = torch.tensor(list(text_ids), dtype=torch.long)[:, None].expand_as(best)
        values = torch.cat([self.values, best])
        texts = torch.cat([self.texts, ids])
        positions = torch.cat([self.positions, where])
        # Stable: on a tie the entry already kept (an earlier batch) stays ahead.
        order = torch.sort(values, dim=0, descending=True, stable=True).indices[: self.k]
        self.values, self.texts = values.gather(0, order), texts.gather(0, order)
        self.positions = positions.gather(0, order)
        fresh = (order >= self.k) & (self.values > 0)
        for slot, column in fresh.nonzero().tolist():
            row = int(order[slot, column]) - self.k
            text = int(self.texts[slot, column])
            self.kept[(column, text)] = acts[row, : lengths[row], column].clone()
        wanted = {
            (column, text)
            for column, text in zip(
                torch.arange(self.texts.shape[1]).expand_as(self.texts).flatten().tolist(),
                self.texts.flatten().tolist(),
                strict=True,
            )
        }
        self.kept = {key: value for key, value in self.kept.items() if key in wanted}


class PositionStats:
    """Counts, sums, maxima and histograms of each feature over the positions seen so far."""

    def __init__(self, n_features: int) -> None:
        self.histogram = StreamingHistogram(n_features)
        self.active = torch.zeros(n_features, dtype=torch.int64)
        self.total = torch.zeros(n_features, dtype=torch.float64)
        self.maxima = torch.zeros(n_features, dtype=torch.float64)
        self.positions = 0

    def add(self, values: torch.Tensor) -> None:
        """`values`: (positions, n_features), real positions only."""
        self.positions += len(values)
        self.active += (values > 0).sum(dim=0)
        self.total += values.double().sum(dim=0)
        if len(values):
            self.maxima = torch.maximum(self.maxima, values.double().max(dim=0).values)
        self.histogram.add(values)

    def finish(self, texts: int) -> list[ActivationStats]:
        quantiles = self.histogram.quantiles(QUANTILE_LEVELS, self.maxima)
        coarse = self.histogram.coarse(self.maxima)
        result = []
        for column in range(len(self.active)):
            peak, active = float(self.maxima[column]), int(self.active[column])
            result.append(
                ActivationStats(
                    texts=texts,
                    positions=self.positions,
                    active=active,
                    frequency=active / self.positions if self.positions else 0.0,
                    max=peak,
                    mean_active=float(self.total[column]) / active if active else None,
                    quantile_levels=list(QUANTILE_LEVELS),
                    quantile_values=quantiles[column].tolist(),
                    hist_edges=torch.linspace(0.0, peak or 1.0, HIST_BINS + 1).tolist(),
                    hist_counts=coarse[column].tolist(),
                )
            )
        return result


def scan_corpus(
    loaded: LoadedModel,
    corpus: TokenizedCorpus,
    features: Sequence[Feature],
    top_k: int = 10,
    batch_size: int = 32,
    window: tuple[int, int] = WINDOW,
    progress: Callable[[int, int], None] | None = None,
) -> dict[Feature, FeatureScan]:
    """Top-`top_k` contexts and activation statistics of every feature, in one corpus pass."""
    columns = sorted(dict.fromkeys((int(layer), int(f)) for layer, f in features))
    if not columns:
        return {}
    stats, contexts = PositionStats(len(columns)), TopContexts(len(columns), top_k)
    skip = _zero_positions(loaded).stop or 1
    # Texts of similar length share a batch: less padding.
    order = sorted(range(len(corpus.token_ids)), key=lambda i: len(corpus.token_ids[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        sequences = [corpus.token_ids[i] for i in chunk]
        acts = batch_activations(loaded, sequences, columns)  # (b, n_pos, n), 0 at padding/BOS
        lengths = [len(s) for s in sequences]
        valid = torch.arange(acts.shape[1])[None, :] < torch.tensor(lengths)[:, None]
        valid[:, :skip] = False  # BOS (circuit-tracer zeroes these positions)
        stats.add(acts[valid])
        contexts.add(chunk, acts, lengths)
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    decode = token_decoder(loaded.tokenizer)
    return {
        feature: FeatureScan(
            stats=summary,
            examples=_examples(contexts, column, corpus, window, skip, loaded.tokenizer, decode),
        )
        for column, (feature, summary) in enumerate(
            zip(columns, stats.finish(len(corpus.token_ids)), strict=True)
        )
    }


def batch_activations(
    loaded: LoadedModel, sequences: Sequence[Sequence[int]], columns: Sequence[Feature]
) -> torch.Tensor:
    """(n_texts, longest, len(columns)) float32 on the CPU: the chosen features' activations,
    0 at padding and at BOS (circuit-tracer's `zero_positions`)."""
    lengths = [len(s) for s in sequences]
    if loaded.identity.backend != "nnsight":
        return _one_by_one(loaded, sequences, columns)
    hf = loaded.model._model
    pad = loaded.tokenizer.pad_token_id or 0
    batch = torch.full((len(sequences), max(lengths)), pad, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        batch[row, : len(sequence)] = torch.tensor(list(sequence))
    record: dict[int, torch.Tensor] = {}
    by_layer = _by_layer(columns)
    with (
        torch.inference_mode(),
        finite_guard(loaded._checkpoints),
        _recording(hf, loaded, by_layer, record),
    ):
        hf(input_ids=batch.to(loaded.precision.device))
    acts = torch.cat([record[layer] for layer in sorted(by_layer)], dim=-1)
    acts[:, _zero_positions(loaded)] = 0
    padding = torch.arange(acts.shape[1])[None, :] >= torch.tensor(lengths)[:, None]
    acts[padding] = 0
    return acts


def _by_layer(columns: Sequence[Feature]) -> dict[int, torch.Tensor]:
    layers: dict[int, list[int]] = {}
    for layer, feature in columns:  # sorted: the layers' blocks concatenate in column order
        layers.setdefault(layer, []).append(feature)
    return {layer: torch.tensor(fs) for layer, fs in layers.items()}


@contextmanager
def _recording(hf, loaded: LoadedModel, by_layer: dict[int, torch.Tensor], record: dict):
    """Hooks that encode each chosen layer's read site and keep the chosen features only."""
    hooks = feature_hooks(loaded, "activation scans")
    handles = []
    for layer in by_layer:

        def keep(x, layer=layer):
            chosen = by_layer[layer].to(x.device)
            record[layer] = hooks.dictionary.encode(layer, x)[..., chosen].float().cpu()

        handles.append(hooks.on_read(layer, keep))
    with removing(handles):
        yield


def _one_by_one(
    loaded: LoadedModel, sequences: Sequence[Sequence[int]], columns: Sequence[Feature]
) -> torch.Tensor:
    """TransformerLens: circuit-tracer's own `get_activations`, one text at a time."""
    from emc.analysis.forward_diff import feature_activations

    layers = torch.tensor([layer for layer, _ in columns])
    index = torch.tensor([feature for _, feature in columns])
    out = torch.zeros(len(sequences), max(len(s) for s in sequences), len(columns))
    for row, sequence in enumerate(sequences):
        acts = feature_activations(loaded, torch.tensor(list(sequence)))
        out[row, : len(sequence)] = acts[layers, :, index].T
    return out


def _zero_positions(loaded: LoadedModel) -> slice:
    zero = getattr(loaded.model, "zero_positions", None)
    return zero if isinstance(zero, slice) else slice(0, 1)


def _examples(
    contexts: TopContexts,
    column: int,
    corpus: TokenizedCorpus,
    window: tuple[int, int],
    skip: int,
    tokenizer,
    decode,
) -> list[FeatureExample]:
    before, after = window
    examples = []
    for slot in range(contexts.k):
        value = float(contexts.values[slot, column])
        if not value > 0:
            break
        text = int(contexts.texts[slot, column])
        peak = int(contexts.positions[slot, column])
        acts = contexts.kept[(column, text)]
        ids = corpus.token_ids[text]
        first = max(skip, peak - before)  # BOS is never part of an example
        last = min(len(ids), peak + after + 1)
        shown = ids[first:last]
        examples.append(
            FeatureExample(
                rank=slot + 1,
                source=corpus.sources[text],
                text=tokenizer.decode(shown),
                token_ids=list(shown),
                tokens=[decode(i) for i in shown],
                activations=acts[first:last].tolist(),
                max_position=peak - first,
                max_activation=value,
                start=first,
            )
        )
    return examples
