"""The layer rules of docs/design.md, checked on the import statements: cheap, and it fails loudly."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "gateway"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_production_code_never_imports_the_simulator():
    # Only the CLI may start a simulator (gateway simulator / demo / bench).
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "simulator" or rel.name in ("cli.py", "__main__.py"):
            continue
        bad = {n for n in imports_of(path) if n.startswith("gateway.simulator")}
        assert not bad, f"{rel} imports {bad}"


def test_errors_and_observability_are_leaf_layers():
    for rel in ("errors.py",):
        assert not {n for n in imports_of(ROOT / rel) if n.startswith("gateway")}, rel
    for path in (ROOT / "observability").rglob("*.py"):
        assert not {n for n in imports_of(path) if n.startswith("gateway.") and
                    not n.startswith(("gateway.errors", "gateway.observability"))}, path


def test_no_grab_bag_modules():
    assert not [p for p in ROOT.rglob("*.py") if p.stem in ("utils", "util", "helpers", "misc", "common")]


def _gateway_imports(path: Path) -> set[str]:
    return {n for n in imports_of(path) if n.startswith("gateway")}


def test_the_model_and_the_relay_protocol_are_pure():
    assert not _gateway_imports(ROOT / "model.py")
    assert _gateway_imports(ROOT / "relay" / "protocol.py") <= {"gateway.model", "gateway.errors"}


def test_adapters_never_import_each_other_or_the_wiring():
    adapters = {"sources": "gateway.sources", "relay": "gateway.relay", "store": "gateway.store"}
    wiring = ("gateway.app", "gateway.api", "gateway.cli", "gateway.service", "gateway.commands")
    for folder, own in adapters.items():
        others = tuple(p for p in adapters.values() if p != own)
        for path in (ROOT / folder).rglob("*.py"):
            bad = {n for n in _gateway_imports(path) if n.startswith(others + wiring)}
            if folder == "relay":  # the pure protocol module is shared by both ends of the tunnel
                bad.discard("gateway.relay.protocol")
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_command_service_knows_ports_not_exchange():
    for path in (ROOT / "commands").rglob("*.py"):
        bad = {n for n in _gateway_imports(path) if n.startswith(("gateway.sources", "gateway.relay.tunnel",
                                                                   "gateway.relay.hub", "gateway.app", "gateway.api"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
