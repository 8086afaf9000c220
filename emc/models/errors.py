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


class PromptTooLongError(ValueError):
    """A sequence longer than the model's context: refused rather than run out of positions."""

    def __init__(self, tokens: int, context: int) -> None:
        super().__init__(
            f"the prompt is {tokens} tokens, longer than the model's context of {context} "
            "positions: shorten it"
        )
        self.tokens = tokens
        self.context = context


class ItemMemoryError(MemoryError):
    """One sequence that cannot be run even alone: the allocator failed (GPU or CPU)."""

    def __init__(self, tokens: int, cause: BaseException) -> None:
        detail = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else ""
        super().__init__(
            f"out of memory running a sequence of {tokens} tokens even alone "
            f"({type(cause).__name__}: {detail})"
        )
        self.tokens = tokens


_ALLOCATION_MESSAGES = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "failed to allocate",
)


def is_allocation_failure(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError
    ("DefaultCPUAllocator: can't allocate memory: you tried to allocate ...")."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in message for m in _ALLOCATION_MESSAGES)
