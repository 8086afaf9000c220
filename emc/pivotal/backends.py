"""Build the generator and judge a config asks for: an OpenAI-compatible LLM, or offline."""

from __future__ import annotations

from pathlib import Path

from emc.config import ConfigError, ExperimentConfig
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
