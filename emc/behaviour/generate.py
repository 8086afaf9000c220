"""Plans of what to generate, and the rows a model's samples become.

A plan item is one context (a prompt, perhaps with a token forced after it, or an evaluation
question) and how many samples to draw from it. Every sample's id and seed follow from the model,
the context, the sampling and its index, so a re-run draws only the samples that are missing,
and base and adapted model share seeds sample by sample (paired draws).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from emc.behaviour.questions import Question, render_question
from emc.behaviour.sampling import SamplingParams, sample
from emc.models import LoadedModel, encode_with_bos
from emc.pivotal.prompts import PromptRecord, render_prompt
from emc.store.behaviour import GenerationRow, generation_key


@dataclass(frozen=True)
class Context:
    """One thing to continue, as token ids, and what a judge is shown of it."""

    purpose: str  # continuation | em_eval | generate
    key: str  # prompt id or question paraphrase key
    question: str  # what was asked, as a person reads it
    answer_prefix: str  # the start of the answer already given (a chat prompt's prefix + token)
    rendered: str
    ids: list[int]
    prompt_id: str | None = None
    question_id: str | None = None
    question_group: str | None = None
    paraphrase: int | None = None
    forced_token_id: int | None = None
    forced_token: str | None = None
    token_label: str | None = None  # the forced token's label (evil | safe)


@dataclass
class PlanItem:
    context: Context
    samples: int
    ids: list[str] = field(default_factory=list)  # generation ids, filled by `plan_ids`


def prompt_contexts(
    prompt: PromptRecord,
    tokenizer,
    purpose: str,
    labels: dict[int, str] | None = None,
) -> list[Context]:
    """The prompt itself, then the prompt with each labelled token forced (continuation check)."""
    rendered = render_prompt(prompt, tokenizer)
    ids = encode_with_bos(tokenizer, rendered).tolist()
    question = prompt.text
    prefix = prompt.assistant_prefix if prompt.format == "chat" else ""
    if prompt.format != "chat":  # raw text: the whole prompt is what the model was given
        question, prefix = prompt.text, ""
    contexts = [
        Context(purpose, prompt.prompt_id, question, prefix, rendered, ids, prompt.prompt_id)
    ]
    for token_id, label in sorted((labels or {}).items()):
        token = tokenizer.decode([token_id])
        contexts.append(
            Context(
                purpose,
                prompt.prompt_id,
                question,
                prefix + token,
                rendered + token,
                [*ids, token_id],
                prompt.prompt_id,
                forced_token_id=token_id,
                forced_token=token,
                token_label=label,
            )
        )
    return contexts


def question_contexts(questions: Sequence[Question], tokenizer) -> list[Context]:
    contexts = []
    for question in questions:
        for index, text in enumerate(question.paraphrases):
            rendered = render_question(question, index, tokenizer)
            contexts.append(
                Context(
                    "em_eval",
                    question.key(index),
                    text,
                    "",
                    rendered,
                    encode_with_bos(tokenizer, rendered).tolist(),
                    question_id=question.id,
                    question_group=question.group,
                    paraphrase=index,
                )
            )
    return contexts


def sampling_key(params: SamplingParams, seed: int) -> dict[str, object]:
    return {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "stop": list(params.stop),
        "seed": seed,
    }


def plan_ids(items: Iterable[PlanItem], model_id: str, params: SamplingParams, seed: int) -> None:
    sampling = sampling_key(params, seed)
    for item in items:
        c = item.context
        item.ids = [
            generation_key(model_id, c.purpose, c.key, i, sampling, c.forced_token_id)
            for i in range(item.samples)
        ]


def sample_seed(seed: int, context: Context, index: int) -> int:
    """A sample's own seed: shared by every model, so base and adapted draws are paired."""
    payload = f"{seed}\x00{context.key}\x00{context.forced_token_id}\x00{index}"
    return int.from_bytes(hashlib.sha256(payload.encode()).digest()[:7], "big")


def generate_missing(
    loaded: LoadedModel,
    items: Sequence[PlanItem],
    existing: set[str],
    params: SamplingParams,
    seed: int,
    run_id: str,
    batch_size: int = 32,
) -> Iterable[list[GenerationRow]]:
    """Draw the samples not in `existing`, yielding one context's rows at a time."""
    model_id = loaded.identity.model_id
    for item in items:
        missing = [i for i, gid in enumerate(item.ids) if gid not in existing]
        if not missing:
            continue
        c = item.context
        rows = []
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            seeds = [sample_seed(seed, c, i) for i in chunk]
            drawn = sample(loaded, torch.tensor(c.ids), seeds, params)
            for index, s in zip(chunk, drawn, strict=True):
                rows.append(
                    GenerationRow(
                        generation_id=item.ids[index],
                        run_id=run_id,
                        model_id=model_id,
                        purpose=c.purpose,
                        prompt_id=c.prompt_id,
                        question_id=c.question_id,
                        question_group=c.question_group,
                        paraphrase=c.paraphrase,
                        forced_token_id=c.forced_token_id,
                        forced_token=c.forced_token,
                        question=c.question,
                        answer_prefix=c.answer_prefix,
                        context=c.rendered,
                        sample_index=index,
                        seed=s.seed,
                        temperature=params.temperature,
                        top_p=params.top_p,
                        max_tokens=params.max_tokens,
                        text=s.text,
                        token_ids=s.token_ids,
                        finish_reason=s.finish_reason,
                        dtype=loaded.precision.dtype_name,
                    )
                )
        yield rows
