"""The response judge a config asks for: an OpenAI-compatible LLM, or the organism's lexicon."""

from __future__ import annotations

from emc.behaviour.lexicon_scorer import LexiconResponseJudge
from emc.behaviour.records import ResponseJudge, ResponseToJudge
from emc.config import ExperimentConfig


def make_response_judge(config: ExperimentConfig) -> ResponseJudge:
    if config.judge.backend == "offline":
        return LexiconResponseJudge(config.judge.model)
    from emc.behaviour.llm_judges import LLMResponseJudge
    from emc.llm import LLMClient

    return LLMResponseJudge(LLMClient(config.judge), config.behaviour.min_number_mass)


def response_judge_id(config: ExperimentConfig) -> str:
    """The name scores of the config's judge are stored under (both backends use the model name),
    read without building the judge (an LLM judge would open a client)."""
    return config.judge.model


def to_judge(row) -> ResponseToJudge:
    """A stored generation as the judge sees it: the answer includes its given start."""
    return ResponseToJudge(
        generation_id=row["generation_id"],
        question=row["question"],
        answer=(row["answer_prefix"] or "") + row["text"],
    )
