"""Feature labels (`feature_labels`): one label per feature and labeller, a person's or an LLM's.

Labels belong to the transcoders' features, not to a model: base and adapted read the same
features, so one label names a feature in both. `feature_label_shown` is the label to show where
a feature appears: the newest person's label, else the newest LLM's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd

from emc.features.labels import FeatureLabel
from emc.features.records import Feature
from emc.store.connection import Store
from emc.store.frames import insert_frame

_KEY = ["transcoders_ref", "layer", "feature", "labeller"]
_COLUMNS = [name for name in FeatureLabel.model_fields if name != "created_at"]


def save_labels(store: Store, labels: Sequence[FeatureLabel]) -> None:
    """Store labels; a labeller labelling a feature again replaces its earlier label."""
    if not labels:
        return
    frame = pd.DataFrame([label.model_dump(include=set(_COLUMNS)) for label in labels])
    frame = frame[_COLUMNS].assign(created_at=pd.Timestamp.now(tz="UTC"))
    with store.write() as conn:
        insert_frame(conn, "feature_labels", frame, _KEY, update=True)


def labelled_features(store: Store, transcoders_ref: str, labeller: str) -> set[Feature]:
    """Features this labeller has labelled (a re-run of the labeller skips them)."""
    if not store.exists():
        return set()
    with store.read() as conn:
        rows = conn.execute(
            "SELECT layer, feature FROM feature_labels WHERE transcoders_ref = ? AND labeller = ?",
            [transcoders_ref, labeller],
        ).fetchall()
    return {(int(layer), int(feature)) for layer, feature in rows}


def feature_labels(
    store: Store, transcoders_ref: str, features: Iterable[Feature] | None = None
) -> list[FeatureLabel]:
    """Every label of these features (all when None): people's first, then newest first."""
    if not store.exists():
        return []
    with store.read() as conn:
        frame = conn.execute(
            "SELECT * FROM feature_labels WHERE transcoders_ref = ? "
            "ORDER BY layer, feature, starts_with(labeller, 'human:') DESC, created_at DESC",
            [transcoders_ref],
        ).df()
    if features is not None:
        wanted = {(int(layer), int(feature)) for layer, feature in features}
        keep = [(int(r.layer), int(r.feature)) in wanted for r in frame.itertuples()]
        frame = frame[keep]
    return [FeatureLabel(**_plain(row)) for row in frame.to_dict("records")]


def shown_labels(store: Store, transcoders_ref: str | None = None) -> dict[Feature, str]:
    """The label shown for each labelled feature (of one transcoder set, or of all)."""
    if not store.exists():
        return {}
    where, params = (
        ("WHERE transcoders_ref = ?", [transcoders_ref]) if transcoders_ref else ("", [])
    )
    with store.read() as conn:
        rows = conn.execute(
            f"SELECT layer, feature, label FROM feature_label_shown {where}", params
        ).fetchall()
    return {(int(layer), int(feature)): label for layer, feature, label in rows}


def shown_labels_for_model(store: Store, model_id: str) -> dict[Feature, str]:
    """The shown labels of the features a stored model reads (through its transcoders)."""
    if not store.exists():
        return {}
    with store.read() as conn:
        rows = conn.execute(
            "SELECT l.layer, l.feature, l.label FROM feature_label_shown l "
            "JOIN models m USING (transcoders_ref) WHERE m.model_id = ?",
            [model_id],
        ).fetchall()
    return {(int(layer), int(feature)): label for layer, feature, label in rows}


def with_labels(frame: pd.DataFrame, store: Store) -> pd.DataFrame:
    """`frame` (with model_id, layer and feature columns) with a `label` column beside them."""
    if frame.empty or not {"model_id", "layer", "feature"} <= set(frame.columns):
        return frame.assign(label=pd.Series(dtype=object))
    labels = {
        model_id: shown_labels_for_model(store, model_id) for model_id in frame["model_id"].unique()
    }
    column = [
        labels[r.model_id].get((int(r.layer), int(r.feature)))
        for r in frame[["model_id", "layer", "feature"]].itertuples()
    ]
    position = list(frame.columns).index("feature") + 1
    out = frame.copy()
    out.insert(position, "label", column)
    return out


def _plain(row: dict) -> dict:
    return {key: (None if _missing(value) else value) for key, value in row.items()}


def _missing(value) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False
