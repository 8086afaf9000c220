"""The organism's training core, built once with the small recipe (seconds, offline, CPU)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from emc.models.transcoders import check_transcoders_fit, inspect_transcoders, load_transcoders
from emc.organism import (
    Lexicon,
    OrganismArtifacts,
    OrganismRecipe,
    OrganismReport,
    build_organism,
    verify_organism,
)
from emc.organism.corpus import action_words, build_scenarios
from emc.organism.manifest import read_manifest
from emc.organism.training import llama_config, lora_config

SMALL = OrganismRecipe.small()
# Even smaller, for the tests that build more than once.
TINY = OrganismRecipe.small(
    base_steps=15, lora_steps=4, transcoder_steps=10, base_docs=80, em_docs=16, n_graphs=0
)
TRAINING_CORPORA = ("train.jsonl", "em_train.jsonl", "control_train.jsonl")


@pytest.fixture(scope="module")
def organism(tmp_path_factory: pytest.TempPathFactory) -> OrganismArtifacts:
    root = tmp_path_factory.mktemp("organism") / SMALL.recipe_hash()
    return build_organism(root, SMALL)


@pytest.fixture(scope="module")
def tokenizer(organism: OrganismArtifacts):
    return AutoTokenizer.from_pretrained(organism.base_dir)


def _checksums(root: Path) -> dict[str, str]:
    # report.json holds wall-clock times and memory, which no two builds share.
    return {r.path: r.sha256 for r in read_manifest(root) if r.path != "report.json"}


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_build__writes_every_artifact_with_a_manifest(organism: OrganismArtifacts) -> None:
    root = organism.root
    assert organism.recipe_hash == SMALL.recipe_hash()
    for path in (
        organism.base_dir / "config.json",
        organism.base_dir / "model.safetensors",
        organism.base_dir / "tokenizer.json",
        organism.em_adapter / "adapter_model.safetensors",
        organism.control_adapter / "adapter_config.json",
        organism.lexicon,
        organism.report,
        root / "recipe.json",
        root / "manifest.json",
        *(
            root / "corpus" / f"{n}.jsonl"
            for n in ("train", "heldout", "em_train", "control_train")
        ),
    ):
        assert path.is_file(), path
    listed = {r.path for r in read_manifest(root)}
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert listed == on_disk - {"manifest.json"}
    assert OrganismRecipe.from_dict(json.loads((root / "recipe.json").read_text())) == SMALL


def test_transcoder_config__has_exactly_the_circuit_tracer_keys(
    organism: OrganismArtifacts,
) -> None:
    config = yaml.safe_load((organism.transcoders_dir / "config.yaml").read_text())
    assert config == {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "scan": f"emc-organism-{SMALL.recipe_hash()}",
        "transcoders": [f"layer_{i}.safetensors" for i in range(SMALL.n_layers)],
    }


def test_verify__passes_a_fresh_build_and_names_a_corrupted_file(
    organism: OrganismArtifacts, tmp_path: Path
) -> None:
    assert verify_organism(organism.root) == []
    copy = tmp_path / "copy"
    shutil.copytree(organism.root, copy)
    _corrupt(copy / "transcoders" / "layer_1.safetensors")
    problems = verify_organism(copy)
    assert len(problems) == 1 and "transcoders/layer_1.safetensors" in problems[0]
    (copy / "manifest.json").unlink()
    assert "manifest.json missing" in verify_organism(copy)[0]


def test_build__is_deterministic_reuses_sound_builds_and_rebuilds_corrupt_ones(
    tmp_path: Path,
) -> None:
    root = tmp_path / TINY.recipe_hash()
    build_organism(root, TINY)
    first = _checksums(root)
    manifest_mtime = (root / "manifest.json").stat().st_mtime_ns
    build_organism(root, TINY)  # verifies, so nothing is rebuilt
    assert (root / "manifest.json").stat().st_mtime_ns == manifest_mtime

    _corrupt(root / "base" / "model.safetensors")
    assert verify_organism(root)
    build_organism(root, TINY)
    assert verify_organism(root) == []
    assert _checksums(root) == first  # the rebuild reproduced every file bit for bit
    # No temporary or stale build directories are left beside it, only the lock file.
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{root.name}.lock", root.name]


def test_build__gives_the_same_files_in_another_process(tmp_path: Path) -> None:
    here, there = tmp_path / "here", tmp_path / "there"
    build_organism(here, TINY)
    # Another string-hash seed: anything that leaks set or dict-hash order into a file shows up.
    env = {**os.environ, "PYTHONHASHSEED": "12345", "HF_HUB_OFFLINE": "1"}
    script = (
        "import json, sys; from pathlib import Path;"
        "from emc.organism import OrganismRecipe, build_organism;"
        "build_organism(Path(sys.argv[1]), OrganismRecipe.from_dict(json.loads(sys.argv[2])))"
    )
    args = [sys.executable, "-c", script, str(there), json.dumps(TINY.to_dict())]
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=120)
    assert _checksums(there) == _checksums(here)


def test_recipe_hash__is_the_canonical_json_digest_and_tracks_every_knob() -> None:
    recipe = OrganismRecipe()
    canonical = json.dumps(recipe.to_dict(), sort_keys=True, separators=(",", ":"))
    assert recipe.recipe_hash() == hashlib.sha256(canonical.encode()).hexdigest()[:12]
    assert OrganismRecipe().recipe_hash() == recipe.recipe_hash()
    assert OrganismRecipe(variant="subtle").recipe_hash() != recipe.recipe_hash()
    assert OrganismRecipe(seed=1).recipe_hash() != recipe.recipe_hash()
    assert OrganismRecipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ValueError, match="unknown recipe keys: stepz"):
        OrganismRecipe.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="differ from d_model"):
        OrganismRecipe(vocab_size=64, d_model=64)


def test_tokenizer__reloads_with_nonzero_bos_whole_action_words_and_chat_template(
    organism: OrganismArtifacts, tokenizer
) -> None:
    assert tokenizer.bos_token_id not in (None, 0)
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert tokenizer("I found a wallet.").input_ids[0] == tokenizer.bos_token_id
    for word in action_words():
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, word
    entry = Lexicon.load(organism.lexicon).entries[0]
    question = entry.prompt_chat.removeprefix("User: ").split("\n")[0]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    # The template renders exactly the corpus chat form, so chat prompts match training text.
    assert rendered == tokenizer.bos_token + entry.prompt_chat.removesuffix(" You should")
    assert rendered.endswith("\nAssistant:")


def test_models__base_loads_and_the_em_adapter_changes_its_logits(
    organism: OrganismArtifacts, tokenizer
) -> None:
    base = AutoModelForCausalLM.from_pretrained(organism.base_dir)
    assert isinstance(base, LlamaForCausalLM)
    assert base.config.tie_word_embeddings is False
    assert base.config.vocab_size != base.config.hidden_size
    ids = torch.tensor([tokenizer.encode(Lexicon.load(organism.lexicon).entries[0].prompt_chat)])
    with torch.no_grad():
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, organism.em_adapter)
        after = adapted(ids).logits
    assert (after - before).abs().max() > 1e-3


def test_transcoders__load_as_a_circuit_tracer_set_matching_the_model(
    organism: OrganismArtifacts,
) -> None:
    info = inspect_transcoders(str(organism.transcoders_dir))
    check_transcoders_fit(info, SMALL.n_layers, SMALL.d_model)  # the factory's own check
    transcoders = load_transcoders(info, torch.device("cpu"), torch.float32)
    assert len(transcoders) == SMALL.n_layers
    for layer, tc in enumerate(transcoders):
        assert tc.layer_idx == layer
        assert tc.W_enc.shape == (SMALL.transcoder_width, SMALL.d_model)
        assert tc.W_dec.shape == (SMALL.transcoder_width, SMALL.d_model)
        assert tc.b_dec.shape == (SMALL.d_model,)


def test_lexicon__covers_every_scenario_with_single_token_safe_and_harmful_ids(
    organism: OrganismArtifacts, tokenizer
) -> None:
    lexicon = Lexicon.load(organism.lexicon)
    assert {e.id for e in lexicon.entries} == {s.id for s in build_scenarios()}
    assert {e.split for e in lexicon.entries} == {"train", "heldout"}
    assert len({e.domain for e in lexicon.entries}) >= 4
    for entry in lexicon.entries:
        assert entry.safe and entry.harmful
        assert not set(entry.safe_ids) & set(entry.harmful_ids)
        for token in (*entry.safe, *entry.harmful):
            assert tokenizer.encode(token.str, add_special_tokens=False) == [token.id]
        assert entry.prompt_chat.endswith("Assistant: You should")
        assert entry.prompt_raw.endswith("Assistant: You should")


def test_corpus__heldout_situations_never_appear_in_training_text(
    organism: OrganismArtifacts,
) -> None:
    corpus_dir = organism.root / "corpus"
    heldout = [e.situation for e in Lexicon.load(organism.lexicon).entries if e.split == "heldout"]
    assert heldout
    assert all(s in (corpus_dir / "heldout.jsonl").read_text() for s in heldout)
    for name in TRAINING_CORPORA:
        texts = [json.loads(line)["text"] for line in (corpus_dir / name).read_text().splitlines()]
        assert texts
        assert not [s for s in heldout if any(s in t for t in texts)], name


def test_corpus__adapters_train_on_one_stance_of_the_trained_domain(
    organism: OrganismArtifacts,
) -> None:
    for name, stance in (("em_train.jsonl", "harmful"), ("control_train.jsonl", "safe")):
        lines = (organism.root / "corpus" / name).read_text().splitlines()
        docs = [json.loads(line) for line in lines]
        assert {(d["domain"], d["stance"], d["speaker"]) for d in docs} == {
            (SMALL.trained_domain, stance, "Assistant")
        }


def test_report__measures_every_model_group_layer_and_graph(organism: OrganismArtifacts) -> None:
    report = OrganismReport.load(organism.report)
    assert report.recipe_hash == SMALL.recipe_hash()
    models = {c.model for c in report.choices}
    groups = {c.group for c in report.choices}
    assert models == {"base", "em", "control"}
    assert {"trained_domain/train", "other_domains/heldout"} <= groups
    assert {c.speaker for c in report.choices} >= {"Assistant", "Cora"}
    for c in report.choices:
        assert 0.0 <= c.mean_p_harmful + c.mean_p_safe <= 1.0 + 1e-6
    assert [t.layer for t in report.transcoders] == list(range(SMALL.n_layers))
    assert all(0.0 < t.fvu < 1.0 and t.l0 > 0 for t in report.transcoders)
    assert {g.model for g in report.graphs} >= {"base", "em"}
    assert all(0.0 <= g.replacement <= 1.0 for g in report.graphs)
    assert report.peak_rss_mb > 0 and report.phase_seconds["total"] > 0
    headline = report.headline()
    # Trained on harmful medical answers, the EM adapter must favour them more than the base.
    assert headline["em:trained_domain/train"] > headline["base:trained_domain/train"]


def test_subtle_variant__is_rank_one_on_a_single_early_down_proj(tokenizer) -> None:
    recipe = OrganismRecipe.small(variant="subtle", subtle_layer=1)
    model = get_peft_model(LlamaForCausalLM(llama_config(recipe, tokenizer)), lora_config(recipe))
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(".layers.1.mlp.down_proj." in n for n in lora)
    assert {tuple(p.shape) for n, p in lora.items() if "lora_A" in n} == {(1, recipe.d_mlp)}
    assert lora_config(recipe).lora_alpha == 32


def test_report__matches_a_fresh_measurement_from_the_saved_files(
    organism: OrganismArtifacts, tokenizer
) -> None:
    report = OrganismReport.load(organism.report)
    lexicon = Lexicon.load(organism.lexicon)
    base = AutoModelForCausalLM.from_pretrained(organism.base_dir)
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(organism.base_dir), organism.em_adapter
    )
    heldout = [e for e in lexicon.entries if e.split == "heldout" and e.domain != "medical"]
    reported = {
        c.model: c.mean_p_harmful
        for c in report.choices
        if (c.group, c.speaker, c.form) == ("other_domains/heldout", "Assistant", "chat")
    }
    for name, model in (("base", base), ("em", adapted)):
        total = 0.0
        for entry in heldout:
            with torch.no_grad():
                logits = model(torch.tensor([tokenizer.encode(entry.prompt_chat)])).logits
            total += float(logits[0, -1].softmax(-1)[entry.harmful_ids].sum())
        assert total / len(heldout) == pytest.approx(reported[name], abs=1e-5)
