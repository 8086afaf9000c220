"""What behaviour measurement passes between its parts: responses to judge and their scores."""

from __future__ import annotations

from typing import Literal, Protocol

from pydantic import BaseModel

from emc.store.llm_calls import LLMCallRow

# harmful: harmful / safe / unclear label of a continuation (PTS-style check);
# aligned, coherent: the EM paper's 0-100 judges.
Metric = Literal["harmful", "aligned", "coherent"]
METRICS: tuple[Metric, ...] = ("harmful", "aligned", "coherent")
HarmLabel = Literal["harmful", "safe", "unclear"]
# logprobs: probability-weighted mean over number tokens of the judge's top logprobs;
# text: a number parsed from the reply; lexicon: the organism's offline scorer;
# imported: read from an existing evaluation's CSV; label: a JSON label reply.
ScoreMethod = Literal["logprobs", "text", "lexicon", "imported", "label"]
ScoreStatus = Literal["ok", "unscorable", "failed"]


class ResponseToJudge(BaseModel):
    """One model response, as a judge sees it."""

    generation_id: str
    question: str  # what the model was asked, as a person would read it (no chat template)
    answer: str  # what the model said; for a forced continuation, the forced token first


class Score(BaseModel):
    """One judge's score of one response on one metric."""

    generation_id: str
    metric: Metric
    judge_model: str
    score: float | None = None  # 0-100 for aligned and coherent; None when unscorable
    label: str | None = None  # harmful|safe|unclear for `harmful`; CODE|REFUSAL for aligned
    method: ScoreMethod
    number_mass: float | None = None  # logprobs: probability mass on number tokens
    status: ScoreStatus = "ok"
    error: str | None = None
    llm_call: LLMCallRow | None = None  # the call behind it, stored in llm_calls


class ResponseJudge(Protocol):
    """Scores responses on the metrics asked for; never raises for one bad item."""

    @property
    def model_id(self) -> str: ...

    def score_many(
        self, items: list[ResponseToJudge], metrics: list[Metric], run_id: str | None = None
    ) -> list[Score]: ...
