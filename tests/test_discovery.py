from __future__ import annotations

import json
import re

import pytest
import yaml

from emc.config import dump_config
from emc.llm import FakeChatServer, ScriptedReply
from emc.organism import Lexicon
from emc.store import Store, list_llm_calls, list_runs, read_only_query
from flows.discovery import discovery_flow, generate_prompts, score_pending_prompts

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _count(store: Store, sql: str) -> int:
    return int(read_only_query(store, sql).iloc[0, 0])


@pytest.fixture
def experiment(tmp_path, small_organism):
    """A fresh data directory whose default config is the (shared) small organism."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "experiment.yaml").write_text(dump_config(small_organism.config))
    return data_dir


def test_discovery_offline_end_to_end_and_idempotent(experiment):
    summary = discovery_flow(data_dir=str(experiment), iterations=2, prompts_per_iteration=3)
    store = Store.in_data_dir(experiment)
    assert [r["added"] for r in summary["rounds"]] == [3, 3]
    assert _count(store, "SELECT count(*) FROM prompts") == 6
    assert _count(store, "SELECT count(*) FROM next_tokens WHERE status = 'ok'") == 12
    assert _count(store, "SELECT count(DISTINCT input_ids) FROM next_tokens") == 6
    assert _count(store, "SELECT count(*) FROM logits WHERE in_top_k") == 12 * 10
    assert _count(store, "SELECT count(*) FROM divergences") == 6
    judged = read_only_query(store, "SELECT judge_model, status FROM judgements")
    assert len(judged) == 6 and set(judged["status"]) == {"ok"}
    assert judged["judge_model"].str.startswith("organism-lexicon:").all()
    labellers = read_only_query(store, "SELECT DISTINCT labeller FROM token_labels")["labeller"]
    assert list(labellers) == [f"judge:{judged['judge_model'][0]}"]
    flagged = _count(store, "SELECT count(*) FROM review_queue WHERE state = 'pending'")
    assert flagged == sum(summary["queue"].values()) and flagged >= 1
    assert _count(store, "SELECT count(*) FROM divergences WHERE p_evil_adapted IS NULL") == 0
    # Provenance: every prompt names its generator and the run that made it.
    sources = read_only_query(store, "SELECT DISTINCT source, run_id FROM prompts")
    assert sources["source"].str.startswith("organism-scenarios:").all()
    assert set(sources["run_id"]) == {summary["run_id"]}

    again = discovery_flow(data_dir=str(experiment), iterations=0)
    assert again["rounds"] == [{"round": 1, "added": 0, "scored": 0, "failed": 0, "judged": 0,
                                "flagged": 0}]  # fmt: skip
    assert _count(store, "SELECT count(*) FROM judgements") == 6
    assert [r.status for r in list_runs(store)] == ["completed", "completed"]


def test_a_killed_run_rerun_completes_the_rest_without_duplicates(experiment):
    store = Store.in_data_dir(experiment)
    # The "killed" run got as far as generating and scoring, never judging.
    generate_prompts.fn(None, str(experiment), 4, "killed-run")
    score_pending_prompts.fn(None, str(experiment), "killed-run")
    assert _count(store, "SELECT count(*) FROM judgements") == 0

    discovery_flow(data_dir=str(experiment), iterations=1, prompts_per_iteration=2)
    assert _count(store, "SELECT count(*) FROM prompts") == 6
    assert _count(store, "SELECT count(*) FROM next_tokens") == 12
    assert _count(store, "SELECT count(*) FROM judgements") == 6
    assert _count(store, "SELECT count(*) - count(DISTINCT prompt_id) FROM judgements") == 0


def test_human_prompts_go_through_the_same_path(experiment, small_organism):
    from emc.pivotal.prompts import make_prompt
    from emc.store.prompts import insert_prompts

    lexicon = Lexicon.load(small_organism.artifacts.lexicon)
    entry = next(e for e in lexicon.entries if e.split == "heldout")
    user = entry.prompt_chat.split("\n")[0].removeprefix("User: ")
    prompt = make_prompt(user, "mine", "human:ana", "chat", " You should")
    insert_prompts(Store.in_data_dir(experiment), [prompt], run_id=None)
    discovery_flow(data_dir=str(experiment), iterations=0)
    row = read_only_query(
        Store.in_data_dir(experiment),
        f"SELECT status, verdict FROM judgements WHERE prompt_id = '{prompt.prompt_id}'",
    )
    assert list(row["status"]) == ["ok"] and row["verdict"][0] is not None


def _fake_llm(lexicon: Lexicon):
    """A chat server that answers like a diligent judge and a generator that repeats itself."""
    harmful = {t.str for e in lexicon.entries for t in e.harmful}
    heldout = [e for e in lexicon.entries if e.split == "heldout"]

    def respond(request: dict) -> ScriptedReply:
        text = request["messages"][-1]["content"]
        if "token_id | token" in text:
            rows = re.findall(r"^(\d+) \| ('.*?'|\".*?\") \|", text, flags=re.M)
            tokens = [
                {
                    "token_id": int(i),
                    "token": eval(s),
                    "label": "evil" if eval(s) in harmful else "safe",
                }
                for i, s in rows
            ]
            body = {"tokens": tokens, "verdict": "evil_injection", "outcome": "elicited_evil",
                    "summary": "harmful option appears", "reason": "fake judge"}  # fmt: skip
        else:
            entry = heldout[0]  # always the same proposal: the generator must not re-store it
            user = entry.prompt_chat.split("\n")[0].removeprefix("User: ")
            body = {"prompts": [{"name": "fake", "prompt": user, "format": "chat",
                                 "assistant_prefix": " You should"}]}  # fmt: skip
        return ScriptedReply(content=json.dumps(body))

    return respond


def test_discovery_with_llm_backends_over_http(tmp_path, small_organism, monkeypatch):
    lexicon = Lexicon.load(small_organism.artifacts.lexicon)
    monkeypatch.setenv("EMC_TEST_KEY", "sk-test-secret-123456")
    with FakeChatServer(responder=_fake_llm(lexicon), model="fake-o3") as server:
        raw = yaml.safe_load(dump_config(small_organism.config))
        for role in ("generator", "judge"):
            raw[role] = {"backend": "openai", "model": "fake-o3", "base_url": server.base_url,
                         "api_key_env": "EMC_TEST_KEY", "timeout_s": 10}  # fmt: skip
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        (data_dir / "experiment.yaml").write_text(yaml.safe_dump(raw))
        summary = discovery_flow(data_dir=str(data_dir), iterations=2, prompts_per_iteration=1)
    store = Store.in_data_dir(data_dir)
    assert [r["added"] for r in summary["rounds"]] == [1, 0]  # the repeat was never stored
    judgement = read_only_query(store, "SELECT judge_model, status, verdict FROM judgements")
    assert list(judgement["judge_model"]) == ["fake-o3"] and list(judgement["status"]) == ["ok"]
    calls = list_llm_calls(store)
    assert {c.purpose for c in calls} >= {"judge"} and all(c.model == "fake-o3" for c in calls)
    dumped = read_only_query(store, "SELECT * FROM llm_calls").to_json()
    assert "sk-test-secret-123456" not in dumped
    sources = read_only_query(store, "SELECT source FROM prompts")["source"]
    assert list(sources) == ["fake-o3"]


def test_judge_failures_are_stored_with_their_status_and_transient_ones_retried(
    tmp_path, small_organism
):
    replies = {"mode": "garbage"}

    def respond(request: dict) -> ScriptedReply:
        if replies["mode"] == "garbage":
            return ScriptedReply(content="I think the answer is evil, probably.")
        return ScriptedReply(content="{}", status=503)

    with FakeChatServer(responder=respond, model="fake-judge") as server:
        raw = yaml.safe_load(dump_config(small_organism.config))
        raw["judge"] = {"backend": "openai", "model": "fake-judge", "base_url": server.base_url,
                        "max_retries": 0, "timeout_s": 5}  # fmt: skip
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        (data_dir / "experiment.yaml").write_text(yaml.safe_dump(raw))
        discovery_flow(data_dir=str(data_dir), iterations=1, prompts_per_iteration=2)
        store = Store.in_data_dir(data_dir)
        rows = read_only_query(store, "SELECT status, raw_response FROM judgements")
        assert list(rows["status"]) == ["json_error", "json_error"]
        assert rows["raw_response"].str.contains("probably").all()
        # json_error is final for this judge: a re-run does not ask again.
        discovery_flow(data_dir=str(data_dir), iterations=0)
        assert _count(store, "SELECT count(*) FROM judgements") == 2

        replies["mode"] = "unavailable"
        discovery_flow(data_dir=str(data_dir), iterations=1, prompts_per_iteration=1)
        third = "SELECT count(*) FROM judgements WHERE status = 'http_error'"
        assert _count(store, third) == 1
        # A transient failure is retried by the next run (and recorded again).
        discovery_flow(data_dir=str(data_dir), iterations=0)
        assert _count(store, third) == 2
        assert _count(store, "SELECT count(*) FROM review_queue") == 0


def test_a_null_fine_tune_flags_nothing_even_when_the_llm_judge_cries_evil(
    tmp_path, small_organism
):
    """The judge proposes, the measured shift decides: base against itself enters no queue."""
    from emc.organism.null_adapters import write_null_adapter

    lexicon = Lexicon.load(small_organism.artifacts.lexicon)
    identity = write_null_adapter(
        small_organism.artifacts.em_adapter, tmp_path / "identity", "identity"
    )
    with FakeChatServer(responder=_fake_llm(lexicon), model="fake-o3") as server:
        raw = yaml.safe_load(dump_config(small_organism.config))
        raw["models"]["adapter"] = {"ref": str(identity)}
        raw["judge"] = {"backend": "openai", "model": "fake-o3", "base_url": server.base_url,
                        "timeout_s": 10}  # fmt: skip
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        (data_dir / "experiment.yaml").write_text(yaml.safe_dump(raw))
        summary = discovery_flow(data_dir=str(data_dir), iterations=1, prompts_per_iteration=4)
    store = Store.in_data_dir(data_dir)
    rows = read_only_query(
        store,
        "SELECT verdict, measured_verdict, measured_outcome, prob_shift, log_odds_shift, flagged "
        "FROM judgements",
    )
    assert len(rows) == 4
    assert set(rows["verdict"]) == {"evil_injection"}  # what the judge proposed, kept
    assert set(rows["measured_verdict"]) <= {"no_issue", "both_evil", "bad_prompt"}
    assert set(rows["measured_outcome"]) <= {"good_idea_failed", "bad_prompt"}
    assert (rows["prob_shift"].abs() < 1e-9).all() and not rows["flagged"].any()
    assert _count(store, "SELECT count(*) FROM review_queue") == 0
    assert summary["queue"]["pending"] == 0
    assert "evil_injection" not in summary["verdicts"]  # counts are of measured verdicts
