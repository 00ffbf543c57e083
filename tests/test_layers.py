"""What the import contracts cannot say. The layer rules themselves are import-linter contracts in pyproject.toml,
checked by `lint-imports` in the test command (scripts/test.sh)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "gateway"


def test_no_grab_bag_modules():
    assert not [p for p in ROOT.rglob("*.py") if p.stem in ("utils", "util", "helpers", "misc", "common")]
