"""User-facing errors: raised at the boundary, printed by the CLI and server without a traceback."""


class LmstackError(Exception):
    """A mistake in what the user asked for; the message says what was wrong and how to fix it."""


class ModelLoadError(LmstackError):
    """A model name, folder or file that cannot be loaded."""


class RequestError(LmstackError):
    """A request that cannot be served as asked (bad sampling parameters, prompt too long)."""
