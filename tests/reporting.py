"""Lines a test wants in the run's output (figures it measured, what a real tool answered):
pytest captures a passing test's prints, so these are printed at the end of the run instead,
in a section of their own (tests/conftest.py's terminal summary)."""

REPORTED: list[str] = []


def report(text: str) -> None:
    REPORTED.extend(text.strip("\n").splitlines())
