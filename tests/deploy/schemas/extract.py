"""Extract one version's ``openAPIV3Schema`` from a CustomResourceDefinition into test data.

The CRD schemas in this folder were made with it from the published CRD files (see
README.md for the sources, tags and commits); the tests never download anything.

    python tests/deploy/schemas/extract.py CRD.yaml VERSION OUT.json --source URL --release TAG
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def extract(crd: dict[str, object], version: str) -> dict[str, object]:
    spec = crd["spec"]
    assert isinstance(spec, dict)
    for v in spec["versions"]:
        if v["name"] == version:
            schema = v["schema"]["openAPIV3Schema"]
            assert isinstance(schema, dict)
            return schema
    raise SystemExit(f"{crd['metadata']}: no version {version}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("crd", type=Path)
    p.add_argument("version")
    p.add_argument("out", type=Path)
    p.add_argument("--source", required=True, help="where the CRD file comes from")
    p.add_argument("--release", required=True, help="the release (tag) and commit")
    args = p.parse_args()
    docs = [d for d in yaml.safe_load_all(args.crd.read_text()) if d]
    (crd,) = docs
    spec = crd["spec"]
    out = {
        "group": spec["group"],
        "kind": spec["names"]["kind"],
        "version": args.version,
        "source": args.source,
        "release": args.release,
        "openAPIV3Schema": extract(crd, args.version),
    }
    args.out.write_text(json.dumps(out, sort_keys=True, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
