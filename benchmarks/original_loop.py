"""Baseline A of `logits_throughput.py`: the original pipeline's reload-per-prompt loop.

Run by `logits_throughput.py` as a subprocess, with a JSON spec on stdin (model directories,
transcoder files, precision, the token ids of every prompt); writes JSON to stdout. It imports
only what the original pipeline's process imported (torch, transformers, peft, circuit-tracer),
not EMC: the cost of a `gc.collect()` grows with every object the process holds, and EMC's
imports (pydantic models, DuckDB, pandas) would charge their heap to this loop.

Per prompt it does what the original did: load the base and the adapted (merged) replacement
model from scratch, one unbatched forward pass each, top-k; then, before the next prompt's load,
release both. The original freed memory "aggressively" (`gc.collect()`, then emptying the CUDA
cache); a careful script collects only if dropping the references does not free the models. The
untimed warm-up (a load and a forward, which also warms imports and the file cache) checks that:
if the models (replacement model, HF module, transcoders) are gone once their references are
dropped, a release drops references only (and empties the CUDA cache on a GPU); if reference
cycles keep them alive, it also runs `gc.collect()`. The warm-up also times one `gc.collect()`,
so that the report can say what collecting would have cost. The models of the last prompt are
released untimed, as the other ways' final release is. The loop runs `repeats` times.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import weakref

import torch
from circuit_tracer.replacement_model.replacement_model_nnsight import NNSightReplacementModel
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def load(spec: dict, role: str) -> NNSightReplacementModel:
    """The replacement model EMC's factory builds, from the same files and precision."""
    dtype = getattr(torch, spec["dtype"])
    device = torch.device(spec["device"])
    hf_model = AutoModelForCausalLM.from_pretrained(
        spec["base_dir"], dtype=dtype, attn_implementation="eager"
    )
    hf_model = hf_model.to(device).eval()
    if role == "adapted":
        hf_model = PeftModel.from_pretrained(hf_model, spec["adapter_dir"]).merge_and_unload()
    transcoders = load_transcoder_set(
        {int(layer): path for layer, path in spec["transcoders"]["paths"].items()},
        scan=spec["transcoders"]["scan"],
        feature_input_hook=spec["transcoders"]["input_hook"],
        feature_output_hook=spec["transcoders"]["output_hook"],
        device=device,
        dtype=dtype,
        lazy_encoder=False,
        lazy_decoder=spec["transcoders"]["lazy_decoder"],
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["base_dir"])
    model = NNSightReplacementModel(hf_model, tokenizer=tokenizer, dispatch=True)
    model._hf_config = hf_model.config
    model._configure_replacement_model(transcoders)
    return model


def top_ids(model: NNSightReplacementModel, ids: list[int], k: int, device: str) -> list[int]:
    # One unbatched forward through the HF module the replacement model wraps: the fastest
    # unbatched forward, the same call EMC's batched path makes.
    batch = torch.tensor([ids], dtype=torch.long, device=device)
    with torch.inference_mode():
        logits = model._model(input_ids=batch).logits[0, -1].float()
    return logits.topk(k).indices.tolist()


def release(models: dict, collect: bool) -> None:
    models.clear()
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def freed_without_collecting(spec: dict) -> bool:
    """Load once, run a forward, drop every reference, and see whether the models are gone."""
    model = load(spec, "adapted")
    top_ids(model, spec["prompts"][0], spec["top_k"], spec["device"])
    transcoders = getattr(model.transcoders, "_module", model.transcoders)  # may be an Envoy
    refs = [weakref.ref(obj) for obj in (model, model._model, transcoders)]
    del transcoders
    del model
    alive = any(ref() is not None for ref in refs)
    gc.collect()  # either way, nothing of the warm-up stays behind
    return not alive


def original_loop(spec: dict, collect: bool) -> dict:
    """One pass over every prompt; times summed over prompts."""
    top: dict[str, list[list[int]]] = {"base": [], "adapted": []}
    load_s = forward_s = release_s = 0.0
    models: dict = {}
    for ids in spec["prompts"]:
        started = time.perf_counter()
        if models:
            release(models, collect)
        released = time.perf_counter()
        models = {role: load(spec, role) for role in ("base", "adapted")}
        loaded = time.perf_counter()
        for role, model in models.items():
            top[role].append(top_ids(model, ids, spec["top_k"], spec["device"]))
        scored = time.perf_counter()
        release_s += released - started
        load_s += loaded - released
        forward_s += scored - loaded
    gc_objects = len(gc.get_objects())
    release(models, collect)
    return {
        "load_s": load_s,
        "forward_s": forward_s,
        "release_s": release_s,
        "gc_objects": gc_objects,
        "top": top,
    }


def run(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    # Warm-up, untimed: imports, file cache, a forward pass, and the release policy.
    gc.disable()  # so that the automatic collector cannot free cycles during the check
    try:
        collect = not freed_without_collecting(spec)
    finally:
        gc.enable()
    started = time.perf_counter()
    gc.collect()
    gc_collect_s = time.perf_counter() - started
    runs = [original_loop(spec, collect) for _ in range(spec["repeats"])]
    return {"collects": collect, "gc_collect_s": gc_collect_s, "runs": runs}


if __name__ == "__main__":
    json.dump(run(json.load(sys.stdin)), sys.stdout)
