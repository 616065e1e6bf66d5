"""The errors llmopt raises for things a user can fix.

Every user-facing failure is an :class:`LlmoptError`: the CLI prints it on one line and exits
non-zero, the server maps its type to a gRPC status code. Anything else escaping llmopt is a bug.
"""

from __future__ import annotations


class LlmoptError(Exception):
    """Root of the errors a user can act on. ``fix`` says what to do about it."""

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message} (fix: {self.fix})" if self.fix else self.message


class SourceError(LlmoptError):
    """The model source cannot be found, read or trusted."""


class UnsupportedError(LlmoptError):
    """The architecture, task or option is not supported."""


class InvalidInputError(LlmoptError):
    """An argument or request value is out of range or malformed."""


class ValidationError(LlmoptError):
    """An exported or transformed model does not compute what its source computes."""

    def __init__(self, message: str, *, fix: str | None = None, report: dict | None = None) -> None:
        super().__init__(message, fix=fix)
        self.report = report or {}


class PackageError(LlmoptError):
    """A model package directory is missing, incomplete or from an incompatible version."""


class ProviderError(LlmoptError):
    """An execution provider is unknown, not installed or failed to load."""


class MissingDependencyError(LlmoptError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(
            f"{package} is not installed",
            fix=f"pip install 'llmopt[{extra}]'",
        )


class BusyError(LlmoptError):
    """The engine or server is at capacity (queue full, memory budget); retry later."""
