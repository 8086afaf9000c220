"""Build the generator, judge and feature labeller a config asks for: an OpenAI-compatible LLM,
or the organism's offline stand-ins."""

from __future__ import annotations

from pathlib import Path

from emc.config import ConfigError, ExperimentConfig
from emc.features.labels import Labeller, LexiconLabeller, LLMLabeller
from emc.llm import LLMClient
from emc.organism.lexicon import Lexicon
from emc.pivotal.generator import Generator, LLMGenerator
from emc.pivotal.judge import Judge, LLMJudge
from emc.pivotal.offline import LexiconJudge, ScenarioGenerator
from emc.pivotal.verdicts import VerdictRules


def make_generator(config: ExperimentConfig) -> Generator:
    if config.generator.backend == "offline":
        return ScenarioGenerator(_lexicon(config, "generator"))
    return LLMGenerator(LLMClient(config.generator))


def make_judge(config: ExperimentConfig) -> Judge:
    if config.judge.backend == "offline":
        return LexiconJudge(_lexicon(config, "judge"), VerdictRules.from_config(config.discovery))
    return LLMJudge(LLMClient(config.judge))


def make_labeller(config: ExperimentConfig) -> Labeller:
    """The feature labeller: `labeller` in the config, else the judge's endpoint."""
    llm = config.labeller or config.judge
    if llm.backend == "offline":
        return LexiconLabeller.from_lexicon(llm.model, _lexicon(config, "labeller"))
    return LLMLabeller(LLMClient(llm))


def labeller_id(config: ExperimentConfig) -> str:
    """The name the config's labeller's labels are stored under, without opening a client."""
    return f"llm:{(config.labeller or config.judge).model}"


def _lexicon(config: ExperimentConfig, role: str) -> Lexicon:
    if not config.ground_truth:
        raise ConfigError(
            f"{role}.backend is 'offline', which needs the organism's ground truth: set "
            "`ground_truth: path/to/lexicon.json` (the organism's config does), or use "
            f"{role}.backend: openai"
        )
    path = Path(config.ground_truth)
    if not path.is_file():
        raise ConfigError(f"ground_truth file not found: {path}")
    return Lexicon.load(path)
