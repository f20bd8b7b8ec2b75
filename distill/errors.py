"""The exceptions a user can cause, and the one-line check every config section uses."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the value and the allowed values."""


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped the run after a checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row, or non-finite weights at export."""


def require(checks: list[tuple]) -> None:
    """(ok, key, value, what is allowed) rows: the first that fails is a ConfigError naming the key and
    value."""
    for ok, key, value, allowed in checks:
        if not ok:
            raise ConfigError(f"{key}: {value!r} is impossible; expected {allowed}.")
