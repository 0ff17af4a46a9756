"""Exceptions with messages that name the problem and, where possible, the fix."""


class DSparkError(Exception):
    """Base class of every error this project raises on purpose."""


class ModelLoadError(DSparkError, FileNotFoundError):
    """A target model path or id could not be resolved or loaded."""


class CorruptCacheError(DSparkError):
    """A cached converted model failed its checksum or is incomplete."""


class InvalidRequestError(DSparkError, ValueError):
    """Bad generation input: empty prompt, max_new_tokens <= 0, bad sampling params..."""
