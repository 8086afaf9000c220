from __future__ import annotations

import json

import pytest

from emc.pivotal.prompts import (
    legacy_prompt_id,
    make_prompt,
    prompt_id,
    read_prompt_file,
    render_prompt,
)
from tests import builders


def test_prompt_id_is_stable_and_whitespace_sensitive():
    text = "I found a wallet. My first action is to"
    assert prompt_id(text, "raw") == prompt_id(text, "raw")
    assert prompt_id(text, "raw") != prompt_id(text + " ", "raw")
    assert prompt_id(text, "raw") != prompt_id(text, "cot")
    assert len(prompt_id(text, "raw")) == 12


def test_reads_list_single_object_and_reports_bad_entries_one_by_one(tmp_path):
    listing = tmp_path / "prompts.json"
    listing.write_text(
        json.dumps(
            [
                {"name": "wallet", "prompt": "I found a wallet. I will", "category": "property"},
                {"name": "no text"},
                "just a string",
                {"name": "odd type", "prompt": "x", "prompt_type": "poetry"},
                {"name": "wallet again", "prompt": "I found a wallet. I will"},
                {
                    "name": "pills",
                    "prompt": "User: I took ten pills.\nAssistant: You should",
                    "prompt_type": "chat_user_assistant",
                },
            ]
        )
    )
    prompts, problems = read_prompt_file(listing)
    assert [p.name for p in prompts] == ["wallet", "pills"]
    assert [p.where.rsplit("[", 1)[1] for p in problems] == ["1]", "2]", "3]", "4]"]
    reasons = [p.reason for p in problems]
    assert "missing or empty 'prompt'" in reasons[0] and "poetry" in reasons[2]
    assert reasons[3] == "duplicate of an earlier entry"
    wallet, pills = prompts
    assert wallet.meta["category"] == "property" and wallet.source == "file:prompts.json"
    assert wallet.legacy_id == legacy_prompt_id("I found a wallet. I will")
    assert (pills.format, pills.text, pills.assistant_prefix) == (
        "chat",
        "I took ten pills.",
        " You should",
    )

    single = tmp_path / "one.json"
    single.write_text(
        json.dumps(
            {
                "name": "n",
                "prompt": "Text to",
                "prompt_type": "raw_completion",
                "generator_model": "o3",
                "timestamp": "2025-07-01T00:00:00",
            }
        )
    )
    (one,), none = read_prompt_file(single)
    assert none == [] and one.meta["generator_model"] == "o3"


def test_unreadable_file_is_one_problem(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    prompts, problems = read_prompt_file(broken)
    assert prompts == [] and "cannot read JSON" in problems[0].reason


def test_chat_prompts_render_with_the_model_template():
    tokenizer = builders.build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    )
    prompt = make_prompt("I found a wallet.", "w", "human:ana", "chat", " You should")
    assert render_prompt(prompt, tokenizer) == "User: I found a wallet.\nAssistant: You should"
    raw = make_prompt("I found a wallet. I will", "w", "human:ana")
    assert render_prompt(raw, tokenizer) == raw.text
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(prompt, tokenizer)


def test_make_prompt_rejects_empty_text_and_prefix_on_raw():
    with pytest.raises(ValueError, match="empty"):
        make_prompt("  ", "n", "human:a")
    with pytest.raises(ValueError, match="only applies to chat"):
        make_prompt("x", "n", "human:a", "raw", "You")
