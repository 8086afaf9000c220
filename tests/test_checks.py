from __future__ import annotations

import torch

from emc.checks import probe_next_tokens
from emc.config import parse_config
from emc.models import load_replacement_model
from tests import builders


def test_probe_records_top_k_and_turns_nan_into_a_failed_row(tiny):
    raw = builders.config_dict(tiny["base"], tiny["transcoders"])
    loaded = load_replacement_model(parse_config(raw), "base")
    try:
        (ok,) = probe_next_tokens(loaded, ["User: hello"], top_k=5, run_id="r")
        assert ok.status == "ok" and len(ok.top_token_ids) == 5
        assert ok.input_ids[0] == loaded.tokenizer.bos_token_id
        assert sorted(ok.top_probs, reverse=True) == ok.top_probs
        with torch.no_grad():
            loaded.model._model.model.layers[1].mlp.up_proj.weight.fill_(float("nan"))
        (bad,) = probe_next_tokens(loaded, ["User: hello"], top_k=5, run_id="r")
        assert bad.status == "failed" and "layer 1" in bad.error and bad.top_tokens == []
    finally:
        loaded.close()
