"""The exceptions omniforge raises for problems a user can fix.

Every error a user or a service can cause is an ``OmniforgeError``; the CLI prints its
message as one sentence and exits 1. Anything else is a bug in omniforge.
"""


class OmniforgeError(Exception):
    """Base of every user-facing error."""


class ModelNotFoundError(OmniforgeError):
    """A model folder or file that was asked for does not exist or is not a model."""


class ConfigError(OmniforgeError):
    """An option value or a config file is invalid."""


class StageError(OmniforgeError):
    """A stage name is unknown, or a stage's inputs do not match its description."""


class ExportError(OmniforgeError):
    """Export failed, or an exported stage missed its parity tolerance."""


class ManifestError(OmniforgeError):
    """A build folder's manifest is missing, invalid, or does not match its artifacts."""


class MissingDependencyError(OmniforgeError):
    """An optional dependency needed for this command is not installed."""


class EngineError(OmniforgeError):
    """An engine file cannot be loaded or run (corrupt, wrong format, wrong backend)."""


class InputError(OmniforgeError):
    """An input handed to the runtime is invalid (name, dtype, shape, value range, file content)."""


class ContextLengthError(InputError):
    """A request does not fit in the model's context."""


class CachePoolExhaustedError(OmniforgeError):
    """The KV-cache pool has no room for this request (other requests are unaffected)."""


class QueueFullError(CachePoolExhaustedError):
    """Too many requests already wait for a KV-cache slot; retry later (a server maps it to a
    retryable status)."""
