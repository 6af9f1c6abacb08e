"""The error every layer raises for bad input caught before compute (the entry point turns it
into exit code 2)."""


class ConfigError(ValueError):
    """Bad input, caught before any compute starts."""
