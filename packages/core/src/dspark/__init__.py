"""DSpark core: target adapter, drafters, verifier, engine and metrics (pure torch).

Nothing in this package imports Lightning or an HTTP stack; training (``train``) and
serving (``serve``) build on it.
"""

from dspark.errors import DSparkError, ModelLoadError, CorruptCacheError, InvalidRequestError

__all__ = ["DSparkError", "ModelLoadError", "CorruptCacheError", "InvalidRequestError"]
__version__ = "0.1.0"
