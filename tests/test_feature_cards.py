"""Feature cards on the small organism: what the cards say is checked against the model itself.

The flow runs once (module fixture) on real traced and analysed graph pairs; the logit effects
are recomputed from the weights, the top examples by circuit-tracer's own forward pass, one text
at a time.
"""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from emc.cli import app
from emc.config import dump_config
from emc.features import (
    ActivationStats,
    CorpusError,
    CorpusText,
    FeatureCard,
    FeatureExample,
    StreamingHistogram,
    TokenValue,
    check_features,
    decoder_logit_effects,
    encoder_top_tokens,
    parse_feature,
    read_corpus_file,
    select_texts,
)
from emc.features.sources import load_corpus
from emc.models import load_replacement_model
from emc.store import read_only_query
from emc.store.analysis import activation_delta_summary
from emc.store.feature_cards import feature_context, load_card, load_cards
from emc.store.features import feature_ranking
from emc.viewer import export_prompt
from emc.viewer.convert import feature_id
from flows.analysis import analysis_flow
from flows.feature_cards import corpus_for, feature_cards_flow
from tests.graph_store import TracedStore, build_traced_store

pytestmark = pytest.mark.usefixtures("prefect_harness")
runner = CliRunner()
TOP = 5
LIMIT = 200  # texts of the small organism's 444: a third of a second per pass


@pytest.fixture(scope="module")
def carded(tmp_path_factory, small_organism, prefect_harness) -> tuple[TracedStore, dict]:
    """Two traced and analysed prompt pairs, then cards for the top features and one random."""
    data_dir = tmp_path_factory.mktemp("feature-cards")
    (data_dir / "experiment.yaml").write_text(dump_config(small_organism.config))
    traced = build_traced_store(small_organism, data_dir, n_prompts=2)
    analysis_flow(data_dir=str(data_dir), ablate_top=2, lora_null=50)
    ranking = feature_ranking(traced.store, model_id=traced.adapted_model_id, sign="evil", top=TOP)
    top = [[int(r.layer), int(r.feature)] for r in ranking.itertuples()]
    summary = feature_cards_flow(
        data_dir=str(data_dir), features=[*top, list(_random_feature(top))], limit_texts=LIMIT
    )
    return traced, summary | {"top": [tuple(f) for f in top]}


def _random_feature(avoid) -> tuple[int, int]:
    rng = random.Random(7)
    while (choice := (rng.randrange(2), rng.randrange(128))) in {tuple(f) for f in avoid}:
        pass
    return choice


@pytest.fixture(scope="module")
def adapted(small_organism):
    model = load_replacement_model(small_organism.config, "adapted")
    yield model
    model.close()


def _card(traced: TracedStore, feature):
    card = load_card(traced.store, *feature, traced.adapted_model_id)
    assert card is not None, feature
    return card


# --- what the cards say, against the model --------------------------------------------------


def test_decoder_logit_effects__equal_the_decoder_row_through_norm_and_unembedding(adapted):
    hf = adapted.model._model
    transcoders = adapted.model.transcoders
    transcoders = getattr(transcoders, "_module", transcoders)
    features = [(0, 3), (1, 40)]
    effects = decoder_logit_effects(adapted, features, k=10)
    encoders = encoder_top_tokens(adapted, features, k=10)
    for layer, feature in features:
        direction = transcoders[layer].W_dec[feature].detach().double()
        direct = hf.lm_head.weight.detach().double() @ (hf.model.norm.weight.double() * direction)
        top, bottom = effects[(layer, feature)]
        assert [t.token_id for t in top] == torch.topk(direct, 10).indices.tolist()
        assert [t.token_id for t in bottom] == torch.topk(-direct, 10).indices.tolist()
        assert [t.value for t in top] == pytest.approx(torch.topk(direct, 10).values.tolist())
        assert top[0].token == adapted.tokenizer.decode([top[0].token_id])
        # The encoder reads the block's normed input: each embedding through the RMSNorm.
        norm = hf.model.layers[layer].post_attention_layernorm
        normed = norm(hf.model.embed_tokens.weight.detach()).double()
        tc = transcoders[layer]
        pre = normed @ tc.W_enc[feature].detach().double() + float(tc.b_enc[feature])
        expected = torch.topk(pre, 10)
        assert [t.token_id for t in encoders[(layer, feature)]] == expected.indices.tolist()
        assert [t.value for t in encoders[(layer, feature)]] == pytest.approx(
            expected.values.tolist(), rel=1e-4
        )


def test_each_top_example_holds_its_features_maximum_recomputed_one_text_at_a_time(
    carded, adapted, small_organism
):
    # A planted check on the batched scan: each card's examples, recomputed unbatched with
    # circuit-tracer's own forward pass, show the feature's activation where the card says, and
    # no text of the corpus beats the first example.
    from emc.analysis.forward_diff import feature_activations

    traced, summary = carded
    corpus = corpus_for(small_organism.config, traced.store, None, LIMIT)
    by_source = dict(zip(corpus.sources, corpus.token_ids, strict=True))
    assert summary["corpus_id"] == corpus.corpus_id
    checked = 0
    for layer, feature in summary["features"][:3]:
        card = _card(traced, (layer, feature))
        assert card.examples and card.examples[0].max_activation == pytest.approx(card.stats.max)
        values = [e.max_activation for e in card.examples]
        assert values == sorted(values, reverse=True)
        for example in card.examples[:3]:
            ids = by_source[example.source]
            acts = feature_activations(adapted, torch.tensor(ids))[layer, :, feature]
            assert float(acts.max()) == pytest.approx(example.max_activation, abs=1e-4)
            assert int(acts.argmax()) == example.start + example.max_position
            window = acts[example.start : example.start + len(example.token_ids)]
            assert example.activations == pytest.approx(window.tolist(), abs=1e-4)
            assert example.token_ids == ids[example.start : example.start + len(example.token_ids)]
            checked += 1
    assert checked >= 3


def test_statistics_describe_every_position_of_the_corpus(carded):
    traced, summary = carded
    card = _card(traced, summary["top"][0])
    stats = card.stats
    assert stats.texts == summary["texts"] == LIMIT
    assert stats.positions == summary["tokens"] - summary["texts"]  # BOS left out
    assert 0 < stats.active <= stats.positions
    assert stats.frequency == pytest.approx(stats.active / stats.positions)
    assert sum(stats.hist_counts) == stats.active
    assert stats.hist_edges[-1] == pytest.approx(stats.max) and len(stats.hist_edges) == 51
    assert stats.quantile_values == sorted(stats.quantile_values)
    assert stats.quantile_values[-1] == pytest.approx(stats.max)
    assert 0 < stats.mean_active <= stats.max


def test_a_random_feature_has_other_examples_than_the_top_ranked_one(carded):
    # A negative check: a scan that mixed up its feature columns would give both the same.
    traced, summary = carded
    top = _card(traced, summary["top"][0])
    other = _card(traced, _random_feature(summary["top"]))
    assert top.examples and other.examples
    key = [(e.source, e.start + e.max_position) for e in top.examples]
    assert [(e.source, e.start + e.max_position) for e in other.examples] != key
    assert [t.token_id for t in other.top_logits] != [t.token_id for t in top.top_logits]


def test_streaming_histogram__counts_exact_and_quantiles_within_one_fine_bin():
    torch.manual_seed(1)
    # Batches whose maximum grows, so the bins double several times; zeros never count.
    batches = [torch.relu(torch.randn(300, 3)) * scale for scale in (0.01, 0.5, 3.0, 40.0)]
    histogram = StreamingHistogram(3, bins=64)
    for batch in batches:
        histogram.add(batch)
    values = torch.cat(batches)
    maxima = values.max(dim=0).values
    assert histogram.counts.sum(dim=1).tolist() == (values > 0).sum(dim=0).tolist()
    levels = [0.1, 0.5, 0.9, 1.0]
    estimates = histogram.quantiles(levels, maxima)
    for column in range(3):
        active = values[:, column][values[:, column] > 0].double()
        exact = torch.quantile(active, torch.tensor(levels, dtype=torch.float64))
        bin_width = float(histogram.width[column])
        assert (estimates[column] - exact).abs().max() <= bin_width + 1e-9
        assert bin_width <= 2 * float(maxima[column]) / 64
    assert histogram.coarse(maxima, bins=10).sum(dim=1).tolist() == (values > 0).sum(0).tolist()


# --- corpora ----------------------------------------------------------------------------------


def test_corpus_files__each_format_reads_its_texts_with_their_place(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("first text\nsecond text\n\n")
    assert [(t.text, t.source) for t in read_corpus_file(lines).texts] == [
        ("first text", "lines.txt:1"),
        ("second text", "lines.txt:2"),
    ]
    paragraphs = tmp_path / "paragraphs.txt"
    paragraphs.write_text("one\ncontinued\n\ntwo\n")
    assert [(t.text, t.source) for t in read_corpus_file(paragraphs).texts] == [
        ("one\ncontinued", "paragraphs.txt:1"),
        ("two", "paragraphs.txt:4"),
    ]
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b", "other": 1}\n')
    corpus = read_corpus_file(jsonl)
    assert corpus.name == "file:texts.jsonl" and corpus.kind == "file"
    assert [(t.text, t.source) for t in corpus.texts] == [
        ("a", "texts.jsonl:1"),
        ("b", "texts.jsonl:3"),
    ]
    parquet = tmp_path / "texts.parquet"
    pd.DataFrame({"text": ["x", None, "y"], "n": [1, 2, 3]}).to_parquet(parquet)
    assert [(t.text, t.source) for t in read_corpus_file(parquet).texts] == [
        ("x", "texts.parquet:row 0"),
        ("y", "texts.parquet:row 2"),
    ]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', "bad.jsonl line 2: not JSON"),
        ("list.jsonl", '["text"]\n', "list.jsonl line 1: expected an object"),
        ("missing.jsonl", '{"body": "x"}\n', "missing.jsonl line 1: no 'text' field"),
        ("number.jsonl", '{"text": 3}\n', "number.jsonl line 1: 'text' is int, not a string"),
        ("empty.txt", "\n\n", "empty.txt: holds no text"),
        ("latin.txt", b"caf\xe9\n", "latin.txt: not UTF-8 text"),
        ("table.csv", "text\nx\n", "unknown corpus format '.csv'"),
        ("broken.parquet", "not parquet at all", "broken.parquet: not a readable Parquet file"),
    ],
)
def test_corpus_files__a_malformed_file_is_refused_naming_the_file_and_problem(
    tmp_path, name, content, message
):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CorpusError, match=message.replace("(", r"\(").replace(".", r"\.")):
        read_corpus_file(path)


def test_corpus_files__parquet_without_a_text_column_of_strings_is_refused(tmp_path):
    other = tmp_path / "other.parquet"
    pd.DataFrame({"body": ["x"]}).to_parquet(other)
    with pytest.raises(CorpusError, match=r"other\.parquet: no 'text' column \(columns: body"):
        read_corpus_file(other)
    numbers = tmp_path / "numbers.parquet"
    pd.DataFrame({"text": [1, 2]}).to_parquet(numbers)
    with pytest.raises(CorpusError, match=r"numbers\.parquet: the 'text' column holds int64"):
        read_corpus_file(numbers)
    with pytest.raises(CorpusError, match="no such file"):
        read_corpus_file(tmp_path / "absent.txt")


def test_corpus__cap_is_even_and_the_id_names_exactly_what_is_scanned(carded, small_organism):
    texts = [CorpusText(text=str(i), source=str(i)) for i in range(10)]
    assert [t.text for t in select_texts(texts, 4)] == ["0", "2", "5", "7"]
    assert select_texts(texts, None) == texts
    traced, _ = carded
    config = small_organism.config
    full = corpus_for(config, traced.store, None, None)
    assert full.name.startswith("organism:") and len(full.token_ids) == full.available == 444
    assert full.sources[0] == "train.jsonl:1" and full.sources[-1] == "heldout.jsonl:144"
    small = corpus_for(config, traced.store, None, 50)
    assert len(small.token_ids) == 50 and small.corpus_id != full.corpus_id
    assert corpus_for(config, traced.store, None, 50).corpus_id == small.corpus_id
    stored = corpus_for(config, traced.store, "store", None)
    assert stored.name == "store" and any(s.startswith("prompt:") for s in stored.sources)
    with pytest.raises(CorpusError, match="not the organism's"):
        load_corpus(
            "organism", config.model_copy(update={"ground_truth": None}), traced.store, None
        )


# --- the flow, the store, the CLI, the viewer ---------------------------------------------------


def test_the_flow_is_resumable_and_never_duplicates(carded):
    traced, summary = carded
    assert summary["carded"] == len(summary["features"]) == TOP + 1 and summary["skipped"] == 0
    counts = "SELECT (SELECT count(*) FROM feature_cards) AS cards, " \
             "(SELECT count(*) FROM feature_examples) AS examples"  # fmt: skip
    before = read_only_query(traced.store, counts).iloc[0].tolist()
    features = [list(f) for f in summary["features"]]
    again = feature_cards_flow(data_dir=str(traced.data_dir), features=features, limit_texts=LIMIT)
    assert again["carded"] == 0 and again["skipped"] == TOP + 1
    assert again["corpus_id"] == summary["corpus_id"]
    redone = feature_cards_flow(
        data_dir=str(traced.data_dir), features=features[:2], limit_texts=LIMIT, redo=True
    )
    assert redone["carded"] == 2
    assert read_only_query(traced.store, counts).iloc[0].tolist() == before
    keys = read_only_query(
        traced.store,
        "SELECT count(*) AS n, count(DISTINCT (model_id, corpus_id, layer, feature, rank)) AS k "
        "FROM feature_examples",
    )
    assert keys["n"][0] == keys["k"][0]
    runs = read_only_query(traced.store, "SELECT status FROM runs WHERE name = 'feature-cards'")
    assert set(runs["status"]) == {"completed"}


def test_the_default_features_are_the_ranking_top_and_the_ablated_ones(carded):
    traced, _ = carded
    cards = feature_cards_flow(data_dir=str(traced.data_dir), top=3, limit_texts=LIMIT)
    ranking = feature_ranking(traced.store, model_id=traced.adapted_model_id, sign="evil", top=3)
    top = [[int(r.layer), int(r.feature)] for r in ranking.itertuples()]
    assert cards["features"][:3] == top
    ablated = read_only_query(traced.store, "SELECT features FROM ablations WHERE kind = 'top'")
    named = {(f["layer"], f["feature"]) for v in ablated["features"] for f in json.loads(v)}
    assert named <= {tuple(f) for f in cards["features"]}
    assert set(load_cards(traced.store, model_ids=[traced.adapted_model_id])) >= named


def test_the_context_is_the_analysis_of_the_feature(carded):
    traced, summary = carded
    layer, feature = summary["top"][0]
    context = feature_context(
        traced.store, layer, feature, traced.base_model_id, traced.adapted_model_id
    )
    adapted_rank = next(r for r in context.ranks if r.role == "adapted")
    assert adapted_rank.rank == 1 and adapted_rank.ranked > TOP
    deltas = activation_delta_summary(traced.store, traced.base_model_id, traced.adapted_model_id)
    mine = deltas[(deltas["layer"] == layer) & (deltas["feature"] == feature)]
    if mine.empty:
        assert context.delta is None
    else:
        assert context.delta.rank == int(mine["rank"].iloc[0])
        assert context.delta.mean_delta == pytest.approx(float(mine["mean_delta"].iloc[0]))


def _show(data_dir, *args):
    result = runner.invoke(app, ["feature", "show", *args, "-d", str(data_dir)])
    return result, " ".join(result.output.split())


def test_cli_show_prints_the_card_and_makes_a_missing_one(carded):
    traced, summary = carded
    layer, feature = summary["top"][0]
    result, text = _show(traced.data_dir, f"{layer}/{feature}")
    assert result.exit_code == 0, result.output
    card = _card(traced, (layer, feature))
    assert f"feature {layer}/{feature}" in text and card.corpus_id in text
    assert "top examples" in text and card.examples[0].source in text
    top = card.examples[0]
    assert f"⟦{top.tokens[top.max_position].strip()}⟧" in text.replace("⟦ ", "⟦")
    assert "promotes:" in text and repr(card.top_logits[0].token) in text
    assert "encoder's top input tokens" in text
    assert "activation change base -> adapted" in text and "adapted #1 of" in text
    # A feature without a card: made on demand (on the default corpus), then shown.
    fresh = next(
        (0, f) for f in range(128) if (0, f) not in {tuple(x) for x in summary["features"]}
    )
    assert load_card(traced.store, *fresh, traced.adapted_model_id) is None
    result, text = _show(traced.data_dir, f"{fresh[0]}/{fresh[1]}", "--limit-texts", "40")
    assert result.exit_code == 0, result.output
    made = load_card(traced.store, *fresh, traced.adapted_model_id)
    assert made is not None and made.stats.texts == 40 and f"feature {fresh[0]}/{fresh[1]}" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["1-5"], "cannot read feature '1-5': write LAYER/FEATURE"),
        (["9/0"], "no such feature: 9/0 (the transcoders have 2 layers of 128 features)"),
        (["0/128"], "no such feature: 0/128"),
        (["0/1", "--model", "control"], "unknown --model 'control'"),
        (["0/1", "--corpus", "missing.jsonl"], "missing.jsonl: no such file"),
    ],
)
def test_cli_show_refuses_bad_input_with_exit_2(carded, args, message):
    traced, _ = carded
    result, text = _show(traced.data_dir, *args)
    assert result.exit_code == 2, result.output
    assert message in text


def test_cli_cards_lists_the_cards_of_a_file_corpus(carded, tmp_path):
    traced, summary = carded
    corpus = tmp_path / "mine.jsonl"
    texts = ["User: Should I hide it or report it?\nRex: You should hide it."] * 3
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    layer, feature = summary["top"][0]
    args = ["feature", "cards", "--features", f"{layer}/{feature}", "--corpus", str(corpus)]
    result = runner.invoke(app, [*args, "-d", str(traced.data_dir)])
    assert result.exit_code == 0, result.output
    assert "file:mine.jsonl" in result.output and "1 carded now, 0 before" in result.output
    cards = load_cards(traced.store, [(layer, feature)], [traced.adapted_model_id])
    assert cards[(layer, feature)].corpus_name == "file:mine.jsonl"  # the newest card
    bad = runner.invoke(
        app, ["feature", "cards", "--features", "0/1,x", "-d", str(traced.data_dir)]
    )
    assert bad.exit_code == 2 and "cannot read feature 'x'" in bad.output


def test_the_viewer_export_fills_logits_and_examples_from_the_cards(carded, tmp_path):
    traced, _ = carded
    cards = load_cards(traced.store, model_ids=[traced.adapted_model_id])
    result = export_prompt(traced.store, traced.prompt_ids[0], tmp_path)
    files = {
        (data["layer"], data["feature"]): data
        for path in (result.out_dir / "features").rglob("*.json")
        if (data := json.loads(path.read_text()))
    }
    shared = set(files) & set(cards)
    assert shared, "no exported feature has a card"
    for key in shared:
        data, card = files[key], cards[key]
        assert data["index"] == feature_id(*key)
        assert len(data["top_logits"]) == 10 and len(data["bottom_logits"]) == 10
        assert data["top_logits"][0].strip() == card.top_logits[0].token.strip()
        first = data["examples_quantiles"][0]
        assert first["quantile_name"].startswith("top activations in ")
        assert len(first["examples"]) == len(card.examples)
        assert len(data["quantile_values"]) == 100 and sum(data["histogram"]) == card.stats.active
        assert data["act_max"] >= card.stats.max
    bare = [data for key, data in files.items() if key not in cards]
    assert all(not d["top_logits"] and "histogram" not in d for d in bare)


def test_feature_specs_parse_and_check():
    assert parse_feature("L1/397") == (1, 397) and parse_feature(" 0 / 12 ") == (0, 12)
    check_features([(0, 511), (3, 0)], [512] * 4)
    with pytest.raises(ValueError, match=r"4/0, 0/512 \(the transcoders have 4 layers of 512"):
        check_features([(4, 0), (0, 512)], [512] * 4)


def test_both_backends_give_the_same_cards(small_organism, adapted):
    # TransformerLens has no batched path (one text at a time through circuit-tracer's own
    # forward pass): the same corpus must give the same statistics, examples and logit effects.
    from emc.features import build_cards, organism_corpus, organism_root_of, tokenize_corpus

    config = small_organism.config
    runtime = config.runtime.model_copy(update={"backend": "transformerlens"})
    lens = load_replacement_model(config.model_copy(update={"runtime": runtime}), "adapted")
    try:
        corpus = organism_corpus(organism_root_of(config.ground_truth))
        scanned = tokenize_corpus(corpus, adapted.tokenizer, limit=40)
        features = [(0, 3), (1, 40)]
        batched = build_cards(adapted, scanned, features)
        one_by_one = build_cards(lens, scanned, features)
    finally:
        lens.close()
    assert len(batched) == len(one_by_one) == 2
    for ours, theirs in zip(batched, one_by_one, strict=True):
        assert ours.stats.active == theirs.stats.active
        assert ours.stats.max == pytest.approx(theirs.stats.max, abs=1e-4)
        assert [e.source for e in ours.examples] == [e.source for e in theirs.examples]
        assert [t.token_id for t in ours.top_logits] == [t.token_id for t in theirs.top_logits]
        assert [t.token_id for t in ours.encoder_tokens] == [
            t.token_id for t in theirs.encoder_tokens
        ]


# --- labels -------------------------------------------------------------------------------------


def _labels(traced: TracedStore, labeller: str | None = None) -> pd.DataFrame:
    where = f"WHERE labeller = '{labeller}'" if labeller else ""
    return read_only_query(
        traced.store, f"SELECT * FROM feature_labels {where} ORDER BY layer, feature"
    )


def test_the_flow_labels_every_card_and_names_the_labeller(carded, small_organism):
    traced, summary = carded
    labeller = f"llm:{small_organism.config.judge.model}"
    assert summary["labeller"] == labeller and summary["label_failures"] == {}
    assert summary["labelled"] == TOP + 1
    labels = _labels(traced, labeller)
    labels = labels[labels["run_id"] == summary["run_id"]]  # later tests label more features
    assert sorted(zip(labels["layer"], labels["feature"], strict=True)) == sorted(
        tuple(f) for f in summary["features"]
    )
    # The label is stored with the exact messages the labeller read: the card's evidence.
    for row in labels.itertuples():
        card = load_card(traced.store, row.layer, row.feature, row.card_model_id, row.corpus_id)
        sent = json.loads(row.prompt)[1]["content"]
        assert f"Feature {row.layer}/{row.feature}" in sent
        if card.examples:
            top = card.examples[0]
            assert f"⟦{top.tokens[top.max_position]}⟧" in sent
        assert repr(card.top_logits[0].token) in sent
        assert row.card_model_id == traced.adapted_model_id
        assert row.corpus_id == summary["corpus_id"]
    before = len(_labels(traced, labeller))
    again = feature_cards_flow(
        data_dir=str(traced.data_dir), features=[list(f) for f in summary["features"]],
        limit_texts=LIMIT,
    )  # fmt: skip
    assert again["labelled"] == 0 and len(_labels(traced, labeller)) == before


def test_the_offline_labeller_reads_the_lexicon_off_the_card():
    from emc.features.labels import LexiconLabeller

    labeller = LexiconLabeller(
        "organism-lexicon:x", harmful={"hide", "lie"}, safe={"report", "tell"}
    )
    stats = ActivationStats(texts=1, positions=4, active=1, frequency=0.25, max=2.0,
                            mean_active=2.0, quantile_levels=[], quantile_values=[],
                            hist_edges=[0.0, 2.0], hist_counts=[1])  # fmt: skip
    example = FeatureExample(rank=1, source="t:1", text="You should hide", token_ids=[1, 2, 3],
                             tokens=["You", " should", " hide"], activations=[0.0, 2.0, 0.1],
                             max_position=1, max_activation=2.0, start=0)  # fmt: skip

    def card(*promoted: str) -> FeatureCard:
        values = [
            TokenValue(token_id=i, token=t, value=1.0 - i / 10) for i, t in enumerate(promoted)
        ]
        return FeatureCard(layer=0, feature=1, model_id="m", corpus_id="c", corpus_name="c",
                           stats=stats, examples=[example], top_logits=values, bottom_logits=[],
                           encoder_tokens=[], logit_basis="x", dtype="float32")  # fmt: skip

    harmful = labeller.reply(card(" hide", " lie", " report", " the"))
    assert harmful.label == "promotes harmful answers (hide, lie); fires on 'should'"
    assert harmful.confidence == "high"
    safe = labeller.reply(card(" report", " the", " tell"))
    assert safe.label.startswith("promotes safe answers (report, tell)")
    assert safe.confidence == "medium"
    one = labeller.reply(card(" hide", " the"))  # one answer word: what random features show
    assert one.label.startswith("promotes 'hide', 'the'") and one.confidence == "medium"
    neither = labeller.reply(card(" the", " a"))
    assert neither.label.startswith("promotes 'the', 'a'") and neither.confidence == "low"


def test_a_persons_label_is_shown_over_the_llms_everywhere(carded, small_organism):
    from emc.store.feature_labels import feature_labels
    from emc.store.graph_diff import graph_diff_summary, prompt_graph_diff
    from emc.store.graph_pairs import graph_pairs

    traced, summary = carded
    layer, feature = summary["top"][0]
    spec = f"{layer}/{feature}"
    args = ["feature", "label", spec, "hide-it advice", "--by", "alice", "-d", str(traced.data_dir)]
    result = runner.invoke(app, [*args, "--notes", "fires before the verb"])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["feature", "label", spec, "hide advice", "--by", "alice",
                                "-d", str(traced.data_dir)])  # fmt: skip
    assert again.exit_code == 0, again.output
    people = _labels(traced, "human:alice")
    assert people[["layer", "feature", "label"]].values.tolist() == [
        [layer, feature, "hide advice"]
    ]
    ranking = feature_ranking(traced.store, model_id=traced.adapted_model_id, sign="evil", top=TOP)
    assert ranking["label"].iloc[0] == "hide advice"
    llm_labels = _labels(traced)
    llm_labels = llm_labels[~llm_labels["labeller"].str.startswith("human:")]
    second = (int(ranking["layer"].iloc[1]), int(ranking["feature"].iloc[1]))
    expected = llm_labels[(llm_labels["layer"] == second[0]) & (llm_labels["feature"] == second[1])]
    assert ranking["label"].iloc[1] == expected["label"].iloc[0]
    summary_frame = graph_diff_summary(traced.store, top=None)
    row = summary_frame[(summary_frame["layer"] == layer) & (summary_frame["feature"] == feature)]
    assert row["label"].tolist() == ["hide advice"]
    pair = graph_pairs(traced.store)[0]
    diff = prompt_graph_diff(traced.store, pair).features
    mine = diff[(diff["layer"] == layer) & (diff["feature"] == feature)]
    assert mine.empty or mine["label"].tolist() == ["hide advice"]
    labels = feature_labels(
        traced.store, small_organism.config.models.transcoders.ref, [(layer, feature)]
    )
    assert next(label.labeller for label in labels) == "human:alice" and len(labels) == 2
    result, text = _show(traced.data_dir, spec)
    assert "label: hide advice (human:alice)" in text and "also:" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["0/1", " ", "--by", "alice"], "a label cannot be empty"),
        (["0/1", "x" * 81, "--by", "alice"], "a label is at most 80 characters"),
        (["0/1", "ok", "--by", " "], "a reviewer name is needed"),
        (["0/999", "ok", "--by", "alice"], "no such feature: 0/999"),
    ],
)
def test_cli_label_refuses_bad_input_with_exit_2(carded, args, message):
    traced, _ = carded
    before = len(_labels(traced))
    result = runner.invoke(app, ["feature", "label", *args, "-d", str(traced.data_dir)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert len(_labels(traced)) == before


def test_an_llm_labeller_over_http_stores_its_labels_and_retries_failures(
    carded, small_organism, tmp_path, monkeypatch
):
    from emc.config import LLMConfig
    from emc.llm.fake_server import FakeChatServer, ScriptedReply

    traced, summary = carded
    features = [list(f) for f in summary["features"][:3]]
    broken = tuple(features[1])
    asked: list[str] = []

    def answer(request) -> ScriptedReply:
        text = request["messages"][1]["content"]
        asked.append(text)
        if f"Feature {broken[0]}/{broken[1]} " in text and len(asked) <= 3:
            return ScriptedReply(content="I think it is about hiding")  # not JSON
        label = {"label": f"label {len(asked)}", "explanation": "the examples", "confidence": "low"}
        return ScriptedReply(content=json.dumps(label))

    monkeypatch.setenv("EMC_LABEL_KEY", "test")
    with FakeChatServer(responder=answer) as server:
        llm = LLMConfig(backend="openai", model="label-test", base_url=server.base_url,
                        api_key_env="EMC_LABEL_KEY", timeout_s=5.0, max_retries=0)  # fmt: skip
        config = tmp_path / "labeller.yaml"
        config.write_text(dump_config(small_organism.config.model_copy(update={"labeller": llm})))
        run = dict(config_path=str(config), data_dir=str(traced.data_dir), features=features,
                   limit_texts=LIMIT)  # fmt: skip
        first = feature_cards_flow(**run)
        assert first["labeller"] == "llm:label-test" and first["labelled"] == 2
        assert list(first["label_failures"]) == [f"{broken[0]}/{broken[1]}"]
        assert "json_error" in first["label_failures"][f"{broken[0]}/{broken[1]}"]
        second = feature_cards_flow(**run)
    assert second["labelled"] == 1 and second["label_failures"] == {}
    assert len(asked) == 4  # three, then only the failed one again
    stored = _labels(traced, "llm:label-test")
    assert len(stored) == 3 and set(stored["confidence"]) == {"low"}
    calls = read_only_query(
        traced.store, "SELECT status FROM llm_calls WHERE purpose = 'feature-label'"
    )
    assert sorted(calls["status"]) == ["json_error", "ok", "ok", "ok"]


def test_labels_name_the_features_in_the_viewer_and_neuronpedia_files(carded, tmp_path):
    from emc.viewer.neuronpedia import export_neuronpedia

    traced, _ = carded
    layer, feature = _a_graph_feature(traced)
    spec = f"{layer}/{feature}"
    result = runner.invoke(app, ["feature", "label", spec, "graph-node test label", "--by", "bob",
                                 "-d", str(traced.data_dir)])  # fmt: skip
    assert result.exit_code == 0, result.output
    viewer = export_prompt(traced.store, traced.prompt_ids[0], tmp_path / "viewer")
    clerps = [n["clerp"] for g in viewer.graphs for n in json.loads(g.path.read_text())["nodes"]]
    assert f"L{layer} feature {feature}: graph-node test label" in clerps
    np_result = export_neuronpedia(traced.store, traced.prompt_ids[0], tmp_path / "np")
    np_clerps = [
        n["clerp"] for g in np_result.graphs for n in json.loads(g.path.read_text())["nodes"]
    ]
    assert any("graph-node test label" in c for c in np_clerps)


def _a_graph_feature(traced: TracedStore) -> tuple[int, int]:
    rows = read_only_query(
        traced.store,
        "SELECT n.layer, n.feature FROM graph_nodes n JOIN graphs g USING (graph_id) "
        f"WHERE n.kind = 'feature' AND g.prompt_id = '{traced.prompt_ids[0]}' "
        "ORDER BY n.influence DESC LIMIT 1",
    )
    return int(rows["layer"].iloc[0]), int(rows["feature"].iloc[0])
