"""The one exception type users see for bad input.

Every check that can fail on user input (a config value, a dataset folder, a
checkpoint) raises :class:`ConfigError` with one sentence that names the problem
and the fix. Entry points catch it and print the sentence instead of a traceback.
"""


class ConfigError(ValueError):
    """Bad user input: unknown names, inconsistent values, empty or corrupt data."""
