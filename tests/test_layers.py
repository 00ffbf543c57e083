"""What the import contracts cannot say. The layer rules themselves are import-linter contracts in pyproject.toml,
checked by `lint-imports` in the test command (scripts/test.sh)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "gateway"


def test_no_grab_bag_modules():
    assert not [p for p in ROOT.rglob("*.py") if p.stem in ("utils", "util", "helpers", "misc", "common")]


WIRING = {"__init__", "__main__", "cli", "bench", "bench_relay", "bench_graph", "demo", "hub", "simulator", "schemas"}


def test_every_part_of_the_appliance_is_inside_the_border_contract():
    # Contracts list modules by name, so a new module would slip past them unless this test makes it join.
    import tomllib

    contracts = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    appliance = next(c for c in contracts if c["name"].startswith("The appliance never imports"))
    covered = {m.removeprefix("gateway.") for m in appliance["source_modules"]}
    parts = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert parts - WIRING - covered == set(), "add these to the appliance's contract in pyproject.toml"
    assert covered <= parts, "the contract names modules that do not exist"


def test_no_test_module_imports_another():
    # Shared helpers and fixtures live in conftest.py or in the plugin and helper modules beside it (not test_*.py):
    # importing a test module runs its tests' fixtures twice over and ties two modules' fates together.
    tests = ROOT.parent / "tests"
    found = [f"{p.name}: {line.strip()}" for p in sorted(tests.glob("*.py"))
             for line in p.read_text().splitlines() if re.match(r"\s*(from|import)\s+tests\.test_", line)]
    assert found == []
