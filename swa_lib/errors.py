"""Errors that many modules raise and entry points catch; a leaf that imports nothing of swa_lib."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value is wrong, possibly given the launched world. Entry points print it and exit with code 2.

    `problems` lists every problem found, so a user fixes their file in one go."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n  - " + "\n  - ".join(problems))
