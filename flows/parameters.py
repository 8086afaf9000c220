"""What each deployable flow takes, as one pydantic model per flow: type, description, choices and
bounds of every parameter.

Prefect draws a deployment's parameter form from the flow function's signature (types, defaults,
bounds) and the `Args:` section of its docstring (descriptions). `takes(Model)` makes the model
the single source of both: it checks that the function's parameters are exactly the model's
fields with the same defaults (at import, so the two cannot drift; the function's order is the
form's), gives the signature the
model's types and bounds, and writes the docstring's `Args:` from the fields' descriptions.
Calling the flow from Python or the `emc` commands is unchanged; Prefect validates the values
against the same types, so a wrong choice fails before any work with the field's name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticUndefined

from emc.features.corpus import DEFAULT_LIMIT, DEFAULT_MAX_TOKENS

F = TypeVar("F", bound=Callable[..., Any])

Select = Literal["flagged", "reviewed"]
Targets = Literal["salient", "labelled", "contrastive"]
Role = Literal["base", "adapted"]
RankingMetric = Literal[
    "total_diff", "total_cohens_d", "direct_diff", "direct_cohens_d",
    "total_weighted_diff", "total_weighted_cohens_d",
    "direct_weighted_diff", "direct_weighted_cohens_d",
]  # fmt: skip
InterventionPart = Literal["decomposition", "adapter", "features", "directions", "rollouts"]
BehaviourPart = Literal["continuations", "em", "generate", "features"]
OrganismVariant = Literal["default", "subtle"]

DATA_DIR_HELP = (
    "The EMC data directory (store, organism, graphs) as the worker sees it. Empty: the work "
    "pool's EMC_DATA_DIR, set by `emc prefect setup --data-dir DIR`; a deployment run with "
    "neither stops before any work."
)
CONFIG_HELP = (
    "An experiment config (YAML) as the worker sees it. Empty: the data directory's own "
    "experiment.yaml (written by `emc organism build`)."
)


class FlowParameters(BaseModel):
    """Where every stage works: the data directory and the experiment config."""

    model_config = ConfigDict(extra="forbid")

    config_path: str | None = Field(None, description=CONFIG_HELP)
    data_dir: str | None = Field(None, description=DATA_DIR_HELP)


class ShardedParameters(FlowParameters):
    """A stage whose heavy work may be handed to shards on other workers (README: Scale-out)."""

    shards: int = Field(
        0,
        ge=0,
        description="0: do the work here. N: hand each model's missing work to N runs of "
        "shard_deployment (on any worker of its pool), then ingest their bundles.",
    )
    spool_dir: str | None = Field(
        None,
        description="With shards: where shards write bundles, shared with the store's host. "
        "Empty: DATA_DIR/spool.",
    )


class PipelineParameters(FlowParameters):
    organism: OrganismVariant | None = Field(
        "default",
        description="Without config_path: build or reuse this organism (default: the EM "
        "adapter; subtle: a weaker one). Empty: use the data directory's experiment.yaml as is.",
    )
    small_organism: bool = Field(
        False, description="The small organism recipe (about a minute on CPU; for trials)."
    )
    iterations: int | None = Field(
        2,
        ge=0,
        description="Discovery rounds (0: only score and judge prompts already stored). "
        "Empty: the config's discovery.iterations.",
    )
    prompts_per_iteration: int | None = Field(
        8, ge=1, description="Prompts the generator writes per round. Empty: the config's."
    )
    select: Select = Field(
        "flagged",
        description="Which review-queue prompts are traced: every flagged one, or only those "
        "a person has reviewed.",
    )
    graphs: int = Field(
        6, ge=0, description="Prompts traced (a graph pair each), most urgent first."
    )
    ablate_top: int = Field(
        5, ge=0, description="Top-ranked features ablated one by one per prompt."
    )
    continuation_samples: int = Field(
        10, ge=1, description="Continuations sampled per context in the behaviour checks."
    )
    eval_samples: int = Field(
        5, ge=1, description="Answers sampled per question paraphrase in the EM evaluation."
    )
    resume: bool = Field(
        True,
        description="After a killed or failed run with the same parameters, do not repeat its "
        "completed discovery; later stages skip what is stored anyway.",
    )


class DiscoveryParameters(FlowParameters):
    iterations: int | None = Field(
        None,
        ge=0,
        description="Discovery rounds (0: only score and judge prompts already stored). "
        "Empty: the config's discovery.iterations.",
    )
    prompts_per_iteration: int | None = Field(
        None,
        ge=1,
        description="Prompts the generator writes per round. Empty: the config's.",
    )
    resume: bool = Field(
        True, description="Continue a killed run's rounds instead of starting new ones."
    )


class TracingParameters(ShardedParameters):
    select: Select | None = Field(
        None,
        description="Which review-queue prompts are traced: every flagged one, or only those "
        "a person has reviewed (never rejected ones). Empty: the config's tracing.select.",
    )
    targets: Targets | None = Field(
        None,
        description="Which next tokens each graph explains: the judge's labelled ones, the "
        "most likely ones, or evil against safe. Empty: the config's tracing.targets.",
    )
    limit: int | None = Field(
        None, ge=1, description="At most this many prompts, most urgent first. Empty: all."
    )
    prompt_ids: list[str] | None = Field(
        None, description="Trace these prompts instead of reading the review queue."
    )
    shard_deployment: str = Field(
        "trace-shard/graphs-to-spool", description="With shards: the deployment that runs a shard."
    )


class AnalysisParameters(FlowParameters):
    prompt_ids: list[str] | None = Field(
        None, description="Analyse these prompts. Empty: every prompt with a graph pair."
    )
    metric: RankingMetric = Field(
        "total_diff",
        description="How features are ranked: mean adapted-minus-base effect on the evil "
        "tokens (diff) or its effect size (cohens_d), total or direct, weighted or not.",
    )
    ablate_top: int = Field(
        5, ge=0, description="Top-ranked features ablated one by one per prompt."
    )
    lora_null: int = Field(
        500, ge=0, description="Random directions in the null distribution of LoRA geometry."
    )
    redo: bool = Field(False, description="Measure prompts again that already have forward diffs.")


class InterventionsParameters(FlowParameters):
    prompt_ids: list[str] | None = Field(
        None, description="Check these prompts. Empty: every prompt with a graph pair."
    )
    parts: list[InterventionPart] | None = Field(
        None,
        description="Which causal checks: decomposition, adapter, features, directions, "
        "rollouts. Empty: all.",
    )
    limit: int | None = Field(None, ge=1, description="At most this many prompts. Empty: all.")
    doses: list[int] | None = Field(
        None, description="Feature counts of the dose-response curve. Empty: the config's."
    )
    redo: bool = Field(False, description="Measure prompts again that already have results.")
    custom: dict | None = Field(
        None,
        description="One custom edit instead of the checks: features as [layer, feature] "
        "pairs, mode, strength, positions (see `emc intervene --help`).",
    )


class EvaluationParameters(ShardedParameters):
    parts: list[BehaviourPart] | None = Field(
        None,
        description="Which behaviour checks: continuations (of flagged prompts, judged harmful "
        "or safe), em (free-form questions: the EM rate), generate (samples of prompt_ids), "
        "features (response features). Empty: continuations and em.",
    )
    prompt_ids: list[str] | None = Field(
        None, description="These prompts instead of the review queue's flagged ones."
    )
    questions_path: str | None = Field(
        None, description="A YAML file of EM questions. Empty: the organism's own set."
    )
    samples: int | None = Field(
        None, ge=1, description="Samples per context or paraphrase. Empty: the config's."
    )
    adapter: str | None = Field(
        None,
        description="Evaluate this adapter (a path or a study fine-tune's name) instead of the "
        "config's, e.g. a control. Empty: the config's.",
    )
    roles: list[Role] | None = Field(None, description="Which models. Empty: base and adapted.")
    limit: int | None = Field(None, ge=1, description="At most this many prompts. Empty: all.")
    shard_deployment: str = Field(
        "behaviour-shard/samples-to-spool",
        description="With shards: the deployment that runs a shard.",
    )


class FeatureCardsParameters(FlowParameters):
    features: list[list[int]] | None = Field(
        None, description="Card these [layer, feature] pairs. Empty: the ranking's top."
    )
    top: int = Field(30, ge=0, description="Features of the adapted model's ranking to card.")
    corpus: str | None = Field(
        None,
        description="Texts to read: empty for the organism's corpus (else the store's text), "
        "`store`, or a file.",
    )
    limit_texts: int | None = Field(
        DEFAULT_LIMIT, ge=1, description="At most this many texts. Empty: all."
    )
    role: Role = Field("adapted", description="Which model reads the texts.")
    metric: RankingMetric = Field("total_diff", description="The ranking the top comes from.")
    named: bool = Field(True, description="Also card the features the causal checks name.")
    top_examples: int = Field(10, ge=1, description="Top-activating examples kept per feature.")
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=2, description="Tokens per text, BOS included.")
    batch_size: int = Field(32, ge=1, description="Texts per forward pass.")
    redo: bool = Field(False, description="Card features again that have cards.")
    label: bool = Field(True, description="Label the cards with the config's labeller.")
    relabel: bool = Field(False, description="Label again features that have labels.")


class ModelCheckParameters(FlowParameters):
    roles: str = Field(
        "base,adapted",
        description="Comma-separated models to load and probe: base, adapted, or both.",
    )


def takes(model: type[BaseModel]) -> Callable[[F], F]:
    """Give a flow function `model`'s parameter types, bounds and descriptions (see the module)."""

    def apply(fn: F) -> F:
        signature = inspect.signature(fn)
        names = list(signature.parameters)
        if set(names) != set(model.model_fields):
            raise TypeError(
                f"{fn.__name__} takes {names}, but {model.__name__} describes "
                f"{list(model.model_fields)}"
            )
        parameters = []
        for name, parameter in signature.parameters.items():
            field = model.model_fields[name]
            default = None if field.default is PydanticUndefined else field.default
            if parameter.default != default:
                raise TypeError(
                    f"{fn.__name__}({name}=...) defaults to {parameter.default!r}, but "
                    f"{model.__name__} says {default!r}"
                )
            annotation = (
                Annotated[(field.annotation, *field.metadata)]
                if field.metadata
                else (field.annotation)
            )
            parameters.append(parameter.replace(annotation=annotation))
        fn.__signature__ = signature.replace(parameters=parameters)
        fn.parameter_model = model  # what deployments' parameters are checked against
        fn.__doc__ = (inspect.getdoc(fn) or "") + "\n\n" + _args_section(model, names)
        return fn

    return apply


def _args_section(model: type[BaseModel], names: list[str]) -> str:
    lines = ["Args:"]
    for name in names:
        lines.append(f"    {name}: {model.model_fields[name].description or ''}")
    return "\n".join(lines)
