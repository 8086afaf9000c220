"""Training on CPU: the tiny base Llama and its LoRA adapters.

Everything is seeded from the recipe and runs on two threads so the same recipe gives the same
weights. Long loops report through an optional `progress(phase, step, total)` callback instead of
printing, so a CLI, a Prefect task or a test can each show (or ignore) it their own way.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from emc.organism.corpus import Document
from emc.organism.recipe import OrganismRecipe

Progress = Callable[[str, int, int], None]
IGNORE = -100  # label value the loss skips
_REPORT_EVERY = 10


@dataclass(frozen=True)
class Example:
    """Token ids of one document and which of them the loss is computed on."""

    input_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]


def seed_everything(seed: int) -> None:
    torch.set_num_threads(2)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def encode_document(
    tokenizer: PreTrainedTokenizerFast, doc: Document, answer_only: bool
) -> Example:
    """BOS + prompt + answer + EOS, tokenised in two parts so the pivot position is exact."""
    prompt = tokenizer.encode(doc.prompt)  # the post-processor adds BOS
    answer = [*tokenizer.encode(doc.answer, add_special_tokens=False), tokenizer.eos_token_id]
    mask = [not answer_only] * len(prompt) + [True] * len(answer)
    return Example(tuple(prompt + answer), tuple(mask))


def encode_documents(
    tokenizer: PreTrainedTokenizerFast, docs: Sequence[Document], answer_only: bool = False
) -> list[Example]:
    return [encode_document(tokenizer, d, answer_only) for d in docs]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; labels are the inputs with padding and unscored tokens ignored."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        attention[row, :n] = 1
        scored = torch.tensor(ex.input_ids)
        scored[~torch.tensor(ex.loss_mask)] = IGNORE
        labels[row, :n] = scored
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10%."""
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def run_training(
    model: torch.nn.Module,
    examples: Sequence[Example],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    pad_id: int,
    seed: int,
    phase: str,
    progress: Progress | None = None,
) -> list[float]:
    """AdamW over random batches of `examples`; returns the loss of every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in range(steps):
        picks = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
        loss = model(**collate([examples[i] for i in picks], pad_id)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if progress and (step % _REPORT_EVERY == 0 or step == steps - 1):
            progress(phase, step + 1, steps)
    model.eval()
    return losses


def llama_config(recipe: OrganismRecipe, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.d_model,
        intermediate_size=recipe.d_mlp,
        num_hidden_layers=recipe.n_layers,
        num_attention_heads=recipe.n_heads,
        num_key_value_heads=recipe.n_heads,
        max_position_embeddings=recipe.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Separate unembedding: circuit-tracer reads it as its own matrix.
        tie_word_embeddings=False,
        # Eager attention makes replacement-model logits equal HF logits bit for bit.
        attn_implementation="eager",
    )


def train_base_model(
    recipe: OrganismRecipe,
    tokenizer: PreTrainedTokenizerFast,
    docs: Sequence[Document],
    progress: Progress | None = None,
) -> LlamaForCausalLM:
    """Pretrain a tiny Llama on the whole text of every base document."""
    seed_everything(recipe.seed)
    model = LlamaForCausalLM(llama_config(recipe, tokenizer))
    examples = encode_documents(tokenizer, docs)
    run_training(
        model,
        examples,
        steps=recipe.base_steps,
        lr=recipe.base_lr,
        batch_size=recipe.batch_size,
        pad_id=tokenizer.pad_token_id,
        seed=recipe.seed,
        phase="base",
        progress=progress,
    )
    return model


def lora_config(recipe: OrganismRecipe) -> LoraConfig:
    """All projections at rank 8 (default), or rank 1 on one early down_proj (subtle)."""
    if recipe.variant == "subtle":
        return LoraConfig(
            r=recipe.subtle_rank,
            lora_alpha=recipe.subtle_alpha,
            target_modules=["down_proj"],
            layers_to_transform=[recipe.subtle_layer],
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
    return LoraConfig(
        r=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha,
        target_modules=list(recipe.lora_targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def train_adapter(
    base: LlamaForCausalLM,
    recipe: OrganismRecipe,
    tokenizer: PreTrainedTokenizerFast,
    docs: Sequence[Document],
    phase: str,
    progress: Progress | None = None,
) -> PeftModel:
    """Fit a LoRA on the answers of `docs` only, leaving `base`'s own weights untouched."""
    seed_everything(recipe.seed + 1)
    model = get_peft_model(copy.deepcopy(base), lora_config(recipe))
    examples = encode_documents(tokenizer, docs, answer_only=True)
    run_training(
        model,
        examples,
        steps=recipe.lora_steps,
        lr=recipe.lora_lr,
        batch_size=recipe.batch_size,
        pad_id=tokenizer.pad_token_id,
        seed=recipe.seed + 1,
        phase=phase,
        progress=progress,
    )
    return model
