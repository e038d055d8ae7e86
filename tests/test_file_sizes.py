"""No Python file of the project passes 400 lines: a file that long usually holds two ideas (STYLE.md)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("swa_lib", "models", "data", "experiments", "benchmarks", "tests")
MAX_LINES = 400


def test_no_python_file_is_over_400_lines():
    files = [p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 50, f"found only {len(files)} Python files: the walk is broken"
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in files}
    too_long = {str(p): n for p, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"over {MAX_LINES} lines (split them): {too_long}"
