#!/usr/bin/env python3
"""Copy the configuration's published JSON Schema into the Helm chart's values schema (the `config` value).

helm/values.schema.json describes the chart's own values by hand; its `config` property and its `$defs` are
gateway/schemas/config.v1.json. Run after `gateway config-schema > gateway/schemas/config.v1.json`:

    python3 scripts/helm-values-schema.py          # rewrites helm/values.schema.json
    python3 scripts/helm-values-schema.py --check  # exit 1 when it is out of date (tests/test_packaging.py)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "gateway" / "schemas" / "config.v1.json"
VALUES = ROOT / "helm" / "values.schema.json"


def spliced(values: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The values schema with `config` and `$defs` taken from the configuration schema (Helm checks with a draft-07
    validator: `$ref`s into `#/$defs/...` are plain JSON pointers and resolve all the same)."""
    out = dict(values)
    out["$defs"] = config["$defs"]
    out["properties"] = {**values["properties"], "config": {
        "description": "gateway.yaml, rendered into a ConfigMap; " + config["description"],
        "type": "object",
        "additionalProperties": config["additionalProperties"],
        "properties": config["properties"],
    }}
    return out


def render() -> str:
    values = json.loads(VALUES.read_text(encoding="utf-8"))
    config = json.loads(CONFIG.read_text(encoding="utf-8"))
    return json.dumps(spliced(values, config), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if text != VALUES.read_text(encoding="utf-8"):
            print(f"{VALUES.relative_to(ROOT)} is out of date with {CONFIG.relative_to(ROOT)}; "
                  "run: python3 scripts/helm-values-schema.py", file=sys.stderr)
            return 1
        return 0
    VALUES.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
