"""The one exception type for bad configuration or input that stops a job before it starts."""


class ConfigError(ValueError):
    """A problem the user can fix: the message is one sentence, shown as is, without a traceback."""
