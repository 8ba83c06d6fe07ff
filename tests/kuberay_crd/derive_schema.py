"""Write the validation schema of a KubeRay CRD (its ``v1`` openAPIV3Schema) as compact JSON, without the
``description`` texts and the ``status`` subtree, which make up most of the CRD's size and play no part in
validating a manifest. Run from the repository root, on the CRD of the KubeRay release the guide requires:

    python tests/kuberay_crd/derive_schema.py ray.io_rayclusters.yaml tests/kuberay_crd/rayclusters.ray.io.v1.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml


def strip(node: Any) -> Any:
    """`node` without ``description`` keys, recursively."""
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def derive(crd: dict[str, Any]) -> dict[str, Any]:
    """The ``v1`` version's openAPIV3Schema of `crd`, without descriptions and status."""
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strip(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    return schema


if __name__ == "__main__":
    source, target = sys.argv[1:3]
    with open(source) as f:
        crd = yaml.safe_load(f)
    with open(target, "w") as f:
        json.dump(derive(crd), f, sort_keys=True, separators=(",", ":"))
        f.write("\n")
