"""Response-level features: which transcoder features tell misaligned answers from aligned ones.

Each response is read by the transcoders of the model that wrote it (its context plus its own
tokens, one forward pass); a feature's value is its activation averaged over the response's
positions. Features are ranked by the difference of means between misaligned and aligned
responses, with Welch's t and Cohen's d as the graph statistics compute them, and the top of the
ranking is compared with the pivotal-token ranking from the graphs (overlap against chance).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb

import numpy as np
import pandas as pd
import torch

from emc.analysis.forward_diff import feature_activations
from emc.analysis.stats import cohens_d, welch_t
from emc.models import LoadedModel, encode_with_bos


def response_ids(loaded: LoadedModel, context: str, text: str, token_ids) -> tuple[list[int], int]:
    """Context ids (BOS first) plus the response's own ids; and where the response starts.

    Sampled responses keep their token ids; imported ones are tokenised on their own, after the
    context, so the context's ids are the ones discovery would use.
    """
    context_ids = encode_with_bos(loaded.tokenizer, context).tolist()
    if token_ids is None or len(token_ids) == 0:
        token_ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    return [*context_ids, *[int(t) for t in token_ids]], len(context_ids)


def mean_response_activation(loaded: LoadedModel, ids: Sequence[int], start: int) -> np.ndarray:
    """(n_layers, d_transcoder) mean activation over the positions from `start`; NaN if none."""
    activations = feature_activations(loaded, torch.tensor(list(ids)))  # (layers, pos, features)
    response = activations[:, start:, :]
    if response.shape[1] == 0:
        return np.full((activations.shape[0], activations.shape[2]), np.nan)
    return response.mean(dim=1).double().numpy()


def rank_features(
    misaligned: np.ndarray, aligned: np.ndarray, d_transcoder: int, top: int = 200
) -> pd.DataFrame:
    """Features by |mean difference| (misaligned - aligned), with Welch t and Cohen's d."""
    if len(misaligned) < 2 or len(aligned) < 2:
        raise ValueError(
            f"need at least two misaligned and two aligned responses, got {len(misaligned)} and "
            f"{len(aligned)}"
        )
    mean_m, mean_a = misaligned.mean(0), aligned.mean(0)
    var_m, var_a = misaligned.var(0, ddof=1), aligned.var(0, ddof=1)
    n_m, n_a = np.full_like(mean_m, len(misaligned)), np.full_like(mean_a, len(aligned))
    t, _ = welch_t(mean_m, var_m, n_m, mean_a, var_a, n_a)
    d = cohens_d(mean_m, var_m, n_m, mean_a, var_a, n_a)
    diff = mean_m - mean_a
    order = np.argsort(-np.abs(diff), kind="stable")[:top]
    return pd.DataFrame(
        {
            "layer": (order // d_transcoder).astype(int),
            "feature": (order % d_transcoder).astype(int),
            "n_misaligned": len(misaligned),
            "n_aligned": len(aligned),
            "mean_misaligned": mean_m[order],
            "mean_aligned": mean_a[order],
            "mean_diff": diff[order],
            "welch_t": np.where(np.isfinite(t[order]), t[order], np.nan),
            "cohens_d": np.where(np.isfinite(d[order]), d[order], np.nan),
            "rank": np.arange(1, len(order) + 1),
        }
    )


@dataclass(frozen=True)
class Overlap:
    k: int  # top-k of each ranking compared
    shared: int
    expected: float  # by chance: k * k / n_features
    p_value: float  # P(at least `shared` by chance), hypergeometric
    n_features: int
    features: list[tuple[int, int]]


def ranking_overlap(
    response_top: Sequence[tuple[int, int]],
    pivotal_top: Sequence[tuple[int, int]],
    n_features: int,
) -> Overlap:
    """How many features two top-k lists share, against drawing k of n at random."""
    a, b = list(dict.fromkeys(response_top)), list(dict.fromkeys(pivotal_top))
    shared = sorted(set(a) & set(b))
    k_a, k_b = len(a), len(b)
    expected = k_a * k_b / n_features if n_features else float("nan")
    total = comb(n_features, k_b)
    tail = sum(
        comb(k_a, i) * comb(n_features - k_a, k_b - i)
        for i in range(len(shared), min(k_a, k_b) + 1)
    )
    return Overlap(
        k=min(k_a, k_b),
        shared=len(shared),
        expected=expected,
        p_value=tail / total if total else float("nan"),
        n_features=n_features,
        features=shared,
    )
