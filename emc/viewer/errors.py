"""What can go wrong between the store and the viewer; every message says what to do next."""

from __future__ import annotations


class ViewerError(RuntimeError):
    """Base class: the CLI prints the message and exits."""


class PromptNotFoundError(ViewerError):
    """No stored prompt has this id or starts with this prefix."""


class AmbiguousPromptError(ViewerError):
    """A prefix matches several prompt ids."""


class NoGraphsError(ViewerError):
    """The prompt has no successful base/adapted graph pair to show."""


class AssetError(ViewerError):
    """A vendored JavaScript package is missing, corrupted or could not be downloaded."""


class FrontendError(ViewerError):
    """circuit-tracer's pages load a script this package does not know how to replace."""


class NoExportedGraphsError(ViewerError):
    """The directory to serve holds no exported graphs."""


class GraphSchemaError(ViewerError):
    """An exported graph does not match the schema of the format it is written in."""


class ExportDirError(ViewerError):
    """The output directory holds files of another format that an export would replace."""
