"""Evil versus safe: which features push the evil targets more than the safe ones.

For each feature, the targets labelled evil and those labelled safe are two samples of that
feature's effect (one observation per labelled target row of `feature_effects`; `unsure` and
unlabelled targets are left out). For every metric (direct, total, and both weighted by the
target probability) it reports each side's mean, their difference (evil minus safe), Welch's t
with its Welch–Satterthwaite degrees of freedom, and Cohen's d.

Choices, made on purpose:
- Variances are sample variances (ddof 1), computed in float64.
- Welch's t needs two observations on each side: with one (or none) on a side, t and df are NaN.
  When both sides have zero variance the standard error is zero: t is +inf or -inf when the means
  differ (perfect separation, signed like the difference) and NaN when they do not; df is NaN.
- Effect size is Cohen's d, the difference over the pooled SD
  `sqrt(((n_e - 1) var_e + (n_s - 1) var_s) / (n_e + n_s - 2))`. Not Hedges' g: a prompt has a
  handful of labelled targets, and Hedges' small-sample factor is 0 at 1 degree of freedom and
  unreliable near it. Expect d to be biased upwards for such small samples. d needs one
  observation on each side and three in all; a zero pooled SD gives +-inf or NaN as for t.
- No p-values (scipy is not a dependency); t and df are enough to rank and to compute them.

A contrastive graph's single custom target (label `evil-minus-safe`, no token id) is already the
evil-minus-safe difference: its effects are reported as `contrastive_<metric>` columns (NaN for
features of graphs without one; the mean if a group has several such rows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from emc.analysis.effects import EFFECT_METRICS
from emc.tracing.targets import CONTRASTIVE_LABEL

FEATURE_KEY = ("node", "layer", "position", "feature")
SIDES = ("evil", "safe")
_LABELS = frozenset({"evil", "safe", "unsure"})
STAT_SUFFIXES = ("evil_mean", "safe_mean", "diff", "welch_t", "welch_df", "cohens_d")


def stat_columns(key: Sequence[str] = FEATURE_KEY) -> tuple[str, ...]:
    """The columns of `evil_vs_safe`'s frame, in order."""
    return (
        *key,
        "n_evil",
        "n_safe",
        *(f"{metric}_{suffix}" for metric in EFFECT_METRICS for suffix in STAT_SUFFIXES),
        *(f"contrastive_{metric}" for metric in EFFECT_METRICS),
    )


def evil_vs_safe(
    effects: pd.DataFrame, labels: Mapping[int, str], by: Sequence[str] = FEATURE_KEY
) -> pd.DataFrame:
    """One row per feature (per distinct `by`) with `stat_columns(by)`; see the module.

    `effects` has `feature_effects`'s columns; `labels` maps token id -> evil | safe | unsure
    (anything else is an error). Each effects row whose token is labelled evil or safe is one
    observation for its `by` group: with the default key, one per labelled target of one graph.
    Every group in `effects` gets a row, with NaN statistics when it has no labelled targets.
    """
    key = list(by)
    metrics = list(EFFECT_METRICS)
    sides = _sides(effects["token_id"], labels)
    data = effects[key].copy()
    data[metrics] = effects[metrics].astype("float64")
    groups = _group_index(effects[key].drop_duplicates().sort_values(key), key)
    summaries = {
        side: data[sides == side].groupby(key)[metrics].agg(["mean", "var", "count"])
        for side in SIDES
    }
    out = pd.DataFrame(index=groups)
    counts = {side: _column(summaries[side], metrics[0], "count", groups) for side in SIDES}
    out["n_evil"], out["n_safe"] = counts["evil"], counts["safe"]
    for metric in metrics:
        mean = {s: _column(summaries[s], metric, "mean", groups) for s in SIDES}
        var = {s: _column(summaries[s], metric, "var", groups) for s in SIDES}
        evil = (mean["evil"], var["evil"], counts["evil"])
        safe = (mean["safe"], var["safe"], counts["safe"])
        t, df = welch_t(*evil, *safe)
        out[f"{metric}_evil_mean"] = mean["evil"]
        out[f"{metric}_safe_mean"] = mean["safe"]
        out[f"{metric}_diff"] = mean["evil"] - mean["safe"]
        out[f"{metric}_welch_t"] = t
        out[f"{metric}_welch_df"] = df
        out[f"{metric}_cohens_d"] = cohens_d(*evil, *safe)
    contrastive = effects["token_id"].isna() & (effects["label"] == CONTRASTIVE_LABEL)
    means = data[contrastive].groupby(key)[metrics].mean().reindex(groups)
    for metric in metrics:
        out[f"contrastive_{metric}"] = means[metric].to_numpy(dtype="float64")
    out = out.reset_index()
    out[["n_evil", "n_safe"]] = out[["n_evil", "n_safe"]].astype("int32")
    return out.reindex(columns=list(stat_columns(key)))


def welch_t(
    mean_a: np.ndarray,
    var_a: np.ndarray,
    n_a: np.ndarray,
    mean_b: np.ndarray,
    var_b: np.ndarray,
    n_b: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Welch's t for mean_a - mean_b and its Welch–Satterthwaite df, elementwise.

    Sample variances (ddof 1). NaN where a side has fewer than two observations; with a zero
    standard error, t is +-inf (means differ) or NaN (equal) and df is NaN.
    """
    mean_a, var_a, n_a, mean_b, var_b, n_b = _floats(mean_a, var_a, n_a, mean_b, var_b, n_b)
    defined = (n_a >= 2) & (n_b >= 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        a, b = var_a / n_a, var_b / n_b
        t = (mean_a - mean_b) / np.sqrt(a + b)
        df = (a + b) ** 2 / (a**2 / (n_a - 1) + b**2 / (n_b - 1))
    return np.where(defined, t, np.nan), np.where(defined, df, np.nan)


def cohens_d(
    mean_a: np.ndarray,
    var_a: np.ndarray,
    n_a: np.ndarray,
    mean_b: np.ndarray,
    var_b: np.ndarray,
    n_b: np.ndarray,
) -> np.ndarray:
    """(mean_a - mean_b) over the pooled SD, elementwise; see the module for the edge cases.

    A side with one observation contributes nothing to the pooled variance (its own variance,
    NaN or not, is ignored); the pooled variance needs n_a + n_b - 2 >= 1.
    """
    mean_a, var_a, n_a, mean_b, var_b, n_b = _floats(mean_a, var_a, n_a, mean_b, var_b, n_b)
    defined = (n_a >= 1) & (n_b >= 1) & (n_a + n_b >= 3)
    with np.errstate(divide="ignore", invalid="ignore"):
        squares = _spread(var_a, n_a) + _spread(var_b, n_b)
        d = (mean_a - mean_b) / np.sqrt(squares / (n_a + n_b - 2))
    return np.where(defined, d, np.nan)


def _spread(var: np.ndarray, n: np.ndarray) -> np.ndarray:
    """(n - 1) * var, zero for n <= 1 (where var itself is undefined)."""
    return np.where(n > 1, (n - 1) * np.nan_to_num(var, nan=0.0), 0.0)


def _floats(*arrays) -> list[np.ndarray]:
    return [np.asarray(a, dtype="float64") for a in arrays]


def _group_index(keys: pd.DataFrame, key: list[str]) -> pd.Index:
    """The index `groupby(key)` gives: a plain Index for one key column, else a MultiIndex."""
    if len(key) == 1:
        return pd.Index(keys[key[0]], name=key[0])
    return pd.MultiIndex.from_frame(keys)


def _column(summary: pd.DataFrame, metric: str, stat: str, groups: pd.MultiIndex) -> np.ndarray:
    column = summary[(metric, stat)].reindex(groups)
    if stat == "count":
        return column.fillna(0).to_numpy(dtype="int64")
    return column.to_numpy(dtype="float64")


def _sides(token_ids: pd.Series, labels: Mapping[int, str]) -> pd.Series:
    """'evil' / 'safe' per row, None for unsure, unlabelled and custom targets."""
    unknown = sorted({str(v) for v in labels.values()} - _LABELS)
    if unknown:
        raise ValueError(f"labels must be evil, safe or unsure; got {', '.join(unknown)}")
    sides = {int(token): label for token, label in labels.items() if label in SIDES}
    return token_ids.astype("Int64").map(sides)


POSITION_FREE_KEY = ("layer", "feature")


def position_free_stats(effects: pd.DataFrame, labels: Mapping[int, str]) -> pd.DataFrame:
    """One graph's features by (layer, feature): effects summed over the positions they act at.

    A feature active at several positions of one prompt acts on each target through all of them,
    so its position-free effect on a target is the sum; `evil_vs_safe` then compares the evil and
    safe targets of those sums. Columns: `stat_columns(POSITION_FREE_KEY)` plus `n_positions`.
    """
    key = list(POSITION_FREE_KEY)
    target = ["target", "token_id", "label"]
    positions = effects.groupby(key)["position"].nunique().rename("n_positions")
    summed = (
        effects.groupby([*key, *target], dropna=False, sort=True)
        .agg(**{m: (m, "sum") for m in EFFECT_METRICS}, prob=("prob", "first"))
        .reset_index()
    )
    stats = evil_vs_safe(summed, labels, by=key)
    stats = stats.merge(positions.reset_index(), on=key, how="left")
    stats["n_positions"] = stats["n_positions"].astype("int32")
    columns = stat_columns(key)
    return stats[[*key, "n_positions", *columns[len(key) :]]]
