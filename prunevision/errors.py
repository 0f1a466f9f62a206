"""Error types shared by modules that must not import each other."""


class ConfigError(ValueError):
    """A configuration problem, reported as one line that names the offending key."""
