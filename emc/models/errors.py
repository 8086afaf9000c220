"""Errors raised while loading or running models; each message says what to fix."""


class ModelLoadError(RuntimeError):
    """A model, adapter or transcoder set could not be found or read."""


class AdapterMismatchError(ModelLoadError):
    """A PEFT adapter that does not fit the base model it is applied to."""


class TranscoderMismatchError(ModelLoadError):
    """A transcoder set whose layers or width do not match the model."""


class NonFiniteActivationError(FloatingPointError):
    """A forward pass produced NaN or inf; `location` names the first module where it appeared."""

    def __init__(self, location: str, detail: str) -> None:
        super().__init__(f"non-finite values (NaN/inf) first appeared at {location}: {detail}")
        self.location = location


def list_problems(problems: list[str], shown: int = 3) -> str:
    """The first few problems joined, and how many more: an error message stays readable."""
    more = len(problems) - shown
    return "; ".join(problems[:shown]) + (f"; and {more} more" if more > 0 else "")
