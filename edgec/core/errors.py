"""Errors that reach the user as one line and an exit code, never a traceback."""

# Exit codes (documented in the README): 0 ok, 1 a check failed, 2 bad input, 3 internal error,
# 4 infeasible latency budget, 5 latency budget missed after retries (edgec.prune), 130 interrupted.
EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_BUDGET_INFEASIBLE = 4
EXIT_BUDGET_MISSED = 5
EXIT_INTERRUPTED = 130


class EdgecError(Exception):
    """Bad input or an impossible request: exit code 2 unless said otherwise."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class CheckFailed(EdgecError):
    """A verification (fold equivalence, export parity) exceeded its tolerance."""

    exit_code = EXIT_CHECK_FAILED


class GateFailed(CheckFailed):
    """A quality gate (edgec.app.gates) failed on the final artifact: exit 1. ``gates`` is the gate report
    (every gate, its limit, value and margin); ``rejected`` the file the artifact went to instead of the output
    (None when nothing was written)."""

    def __init__(self, message: str, gates: dict, rejected: str | None = None):
        super().__init__(message)
        self.gates = gates
        self.rejected = rejected


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (or its type name): enough for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
