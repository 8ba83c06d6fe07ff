"""The cluster configurations in cluster/: launcher YAMLs pass Ray's own validator, KubeRay manifests have
the fields the operator needs, the SLURM script parses, and the documented commands use real options."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.cluster

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


@pytest.mark.parametrize("name, provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_launcher_yaml_passes_rays_validator(name, provider):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / name).read_text())
    config = prepare_config(raw)  # what `ray up` does before validating: fill defaults, min/max workers
    validate_config(config)
    assert config["provider"]["type"] == provider
    types = config["available_node_types"]
    head, workers = types[config["head_node_type"]], [t for n, t in types.items() if n != config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert workers and all(w["resources"]["GPU"] >= 1 and w["max_workers"] > w.get("min_workers", 0)
                           for w in workers), "an autoscaling GPU worker group"
    setup = raw["setup_commands"]
    torch_first = next(i for i, c in enumerate(setup) if "torch" in c and "download.pytorch.org" in c)
    package = next(i for i, c in enumerate(setup) if "scripts/setup.sh" in c)
    assert torch_first < package and "FLEXORA_VENV=system" in setup[package]
    assert raw["file_mounts"] == {"~/flexora_tune": "."}


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]


def _check_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"][0]["image"]
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert {"groupName", "rayStartParams", "template", "minReplicas", "maxReplicas"} <= set(group)
        container = group["template"]["spec"]["containers"][0]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert spec["enableInTreeAutoscaling"] is True


def test_kuberay_raycluster_manifest():
    (doc,) = _docs("raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"])


def test_kuberay_rayjob_runs_flexora_tune_compare():
    (doc,) = _docs("rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert "flexora-tune compare" in spec["entrypoint"] and "--resume" in spec["entrypoint"]
    assert "--storage-path" in spec["entrypoint"]
    _check_cluster_spec(spec["rayClusterSpec"])


def test_slurm_script_parses_and_starts_ray_on_every_node():
    script = CLUSTER / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --nodes" in text and "ray start --head" in text and "ray start --address" in text
    assert "flexora-tune compare --address" in text and "--resume" in text


def test_documented_compare_options_exist():
    from flexora_tune.cli import build_parser

    parser = build_parser()
    compare = parser._subparsers._group_actions[0].choices["compare"]
    options = {o for action in compare._actions for o in action.option_strings}
    texts = [p.read_text() for p in (CLUSTER / "README.md", CLUSTER / "slurm.sbatch", CLUSTER / "aws.yaml",
                                     CLUSTER / "gcp.yaml", CLUSTER / "kuberay" / "rayjob.yaml")]
    used = {word.split("=")[0] for text in texts for line in text.splitlines() if "flexora-tune compare" in line
            for word in line.split("flexora-tune compare", 1)[1].replace("'", " ").replace('"', " ").split()
            if word.startswith("--") and word != "--"}
    assert used and used <= options, f"unknown options in cluster docs: {sorted(used - options)}"
