"""The cluster configurations in cluster/, checked against what the systems that run them do, not only their
syntax: the launcher YAMLs pass Ray's validator and hold the IAM, authentication and dashboard settings Ray's
node providers leave to node_config; the KubeRay manifests validate strictly against the CRD schema of the
KubeRay release the guide requires (tests/kuberay_crd/) and carry service accounts and token auth; the RayJob
entrypoint uploads results even after a failure; the SLURM script, run with stub `srun`, `scontrol`,
`hostname` and `nvidia-smi`, gives each `ray start` step its CPUs, GPUs and a routable head address; the
Docker image copies no credentials; and the documented commands use real options."""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRD_DIR = Path(__file__).resolve().parent / "kuberay_crd"
README = (CLUSTER / "README.md").read_text()
LAUNCHERS = [("aws.yaml", "aws"), ("gcp.yaml", "gcp")]


def _launcher(name: str) -> tuple[dict, dict]:
    """The raw YAML and the config `ray up` works with (Ray's defaults filled in by prepare_config)."""
    from ray.autoscaler._private.util import prepare_config

    raw = yaml.safe_load((CLUSTER / name).read_text())
    return raw, prepare_config(copy.deepcopy(raw))


def _head_and_workers(config: dict) -> tuple[dict, list[dict]]:
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    return head, [t for n, t in types.items() if n != config["head_node_type"]]


@pytest.mark.parametrize("name, provider", LAUNCHERS)
def test_launcher_yaml_passes_rays_validator(name, provider):
    from ray.autoscaler._private.util import validate_config

    raw, config = _launcher(name)
    validate_config(config)
    assert config["provider"]["type"] == provider
    head, workers = _head_and_workers(config)
    assert head["resources"].get("GPU", 0) == 0
    assert workers and all(w["resources"]["GPU"] >= 1 and w["max_workers"] > w.get("min_workers", 0)
                           for w in workers), "an autoscaling GPU worker group"
    setup = raw["setup_commands"]
    torch_first = next(i for i, c in enumerate(setup) if "torch" in c and "download.pytorch.org" in c)
    package = next(i for i, c in enumerate(setup) if "scripts/setup.sh" in c)
    assert torch_first < package and "FLEXORA_VENV=system" in setup[package]
    assert raw["file_mounts"]["~/flexora_tune"] == "."


@pytest.mark.parametrize("name, provider", LAUNCHERS)
def test_launcher_turns_token_auth_on_and_keeps_the_dashboard_private(name, provider):
    _, config = _launcher(name)
    # the token: copied from the machine that runs `ray up` (which then refuses to start without it)
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = config[key]
        starts = [c for c in commands if "ray start" in c]
        assert len(starts) == 1, commands
        words = shlex.split(starts[0].replace(";", " ; "))
        start = next(i for i in range(len(words)) if words[i:i + 2] == ["ray", "start"])
        before = words[:start]
        assert "RAY_AUTH_MODE=token" in before, f"{key}: `ray start` without RAY_AUTH_MODE=token: {starts[0]}"
        options = words[start + 2:]
        assert not any(o.startswith("--dashboard-host") for o in options), f"{key}: {starts[0]}"
        assert "0.0.0.0" not in starts[0] and "::" not in options
    assert any("chmod 600 ~/.ray/auth_token" in c for c in config["head_start_ray_commands"])
    excluded = set(config["rsync_exclude"])
    assert {".git", ".venv", ".env", "*.pem"} <= excluded, "no history, environments or credentials on the nodes"


def test_aws_head_has_its_own_instance_profile_that_may_pass_the_workers_role():
    raw, config = _launcher("aws.yaml")
    head, workers = _head_and_workers(config)
    head_profile = head["node_config"].get("IamInstanceProfile")
    # Ray's AWS bootstrap (_configure_iam_role) keeps a head profile given here; without one it attaches its
    # default ray-autoscaler-v1 role (EC2 + S3 full access, no iam:PassRole), and every worker launch with a
    # worker profile is then refused.
    ray_aws = Path(sys.modules["ray"].__file__).parent / "autoscaler/_private/aws/config.py"
    assert 'if "IamInstanceProfile" in head_node_config:' in ray_aws.read_text()
    assert head_profile and (head_profile.get("Arn") or head_profile.get("Name")), "head needs IamInstanceProfile"
    worker_profiles = [w["node_config"].get("IamInstanceProfile") for w in workers]
    assert all(p and (p.get("Arn") or p.get("Name")) for p in worker_profiles), "workers need the bucket"
    assert all(p != head_profile for p in worker_profiles), "workers must not get the head's EC2/PassRole rights"
    aws = README[README.index("**AWS credentials"):README.index("**GCP credentials")]
    worker_name = worker_profiles[0].get("Arn", worker_profiles[0].get("Name", "")).rsplit("/", 1)[-1]
    head_name = head_profile.get("Arn", head_profile.get("Name", "")).rsplit("/", 1)[-1]
    assert "iam:PassRole" in aws and worker_name in aws and head_name in aws


def test_gcp_nodes_run_as_their_own_narrow_service_accounts():
    _, config = _launcher("gcp.yaml")
    head, workers = _head_and_workers(config)
    head_accounts = [a["email"] for a in head["node_config"]["serviceAccounts"]]
    for worker in workers:
        accounts = worker["node_config"]["serviceAccounts"]
        assert accounts and all(a["email"] not in head_accounts for a in accounts)
        assert all("ray-autoscaler-sa" not in a["email"] for a in accounts), "Ray's account has project-wide rights"
        assert all("cloud-platform" not in s for a in accounts for s in a["scopes"])
    assert all("ray-autoscaler-sa" not in e for e in head_accounts)
    gcp = README[README.index("**GCP credentials"):README.index("## KubeRay")]
    assert "roles/iam.serviceAccountUser" in gcp and "roles/storage.objectAdmin" in gcp


# ---- KubeRay ----------------------------------------------------------------------------------------------

def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]


def _strict(schema: Any) -> Any:
    """A Kubernetes structural schema as JSON Schema that rejects unknown fields, as `kubectl apply` does
    with its default strict field validation: objects with `properties` get additionalProperties false unless
    marked x-kubernetes-preserve-unknown-fields; x-kubernetes-int-or-string allows an int or a string."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if "properties" in out and "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _validate(doc: dict, crd: str) -> None:
    import jsonschema

    schema = _strict(json.loads((CRD_DIR / f"{crd}.ray.io.v1.json").read_text()))
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


def _required_kuberay() -> str:
    return (CRD_DIR / "VERSION").read_text().strip()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def _service_accounts() -> dict[str, dict]:
    docs = _docs("serviceaccounts.yaml")
    assert all(d["apiVersion"] == "v1" and d["kind"] == "ServiceAccount" for d in docs)
    return {d["metadata"]["name"]: d for d in docs}


def _check_cluster_spec(spec: dict) -> None:
    """What the operator and the sweep need beyond the schema: GPU workers that autoscale, token auth, and a
    service account (bucket credentials) on every pod, distinct for the workers that run trial code."""
    assert spec["enableInTreeAutoscaling"] is True
    assert spec.get("authOptions", {}).get("mode") == "token", "job submission on 8265 must need the token"
    assert _version(spec["rayVersion"]) >= (2, 52), "KubeRay token auth needs Ray >= 2.52"
    accounts = _service_accounts()
    head = spec["headGroupSpec"]
    head_account = head["template"]["spec"].get("serviceAccountName")
    assert head_account in accounts, f"head pod: serviceAccountName {head_account!r} not in serviceaccounts.yaml"
    assert head["template"]["spec"]["containers"][0]["image"]
    assert head["rayStartParams"].get("dashboard-host", "") != "0.0.0.0" or spec["authOptions"]["mode"] == "token"
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert {"groupName", "rayStartParams", "template", "minReplicas", "maxReplicas"} <= set(group)
        pod = group["template"]["spec"]
        assert int(pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert pod.get("serviceAccountName") in accounts, f"worker group {group['groupName']}: no service account"
        assert pod["serviceAccountName"] != head_account, "workers must not get the autoscaler's Role"
    for name in {head_account, *(g["template"]["spec"]["serviceAccountName"] for g in groups)}:
        notes = accounts[name]["metadata"].get("annotations", {})
        assert {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"} & set(notes), name


def test_kuberay_raycluster_manifest():
    (doc,) = _docs("raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    _validate(doc, "rayclusters")
    _check_cluster_spec(doc["spec"])


def test_kuberay_rayjob_runs_flexora_tune_compare():
    (doc,) = _docs("rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    _validate(doc, "rayjobs")
    spec = doc["spec"]
    assert "flexora-tune compare" in spec["entrypoint"] and "--resume" in spec["entrypoint"]
    assert "--storage-path" in spec["entrypoint"] and spec["backoffLimit"] >= 1
    _check_cluster_spec(spec["rayClusterSpec"])


def test_crd_validation_is_strict_and_pinned_to_the_required_release():
    (doc,) = _docs("raycluster.yaml")
    typo = copy.deepcopy(doc)
    typo["spec"]["authOption"] = typo["spec"].pop("authOptions")
    with pytest.raises(AssertionError, match="authOption"):
        _validate(typo, "rayclusters")
    newer = copy.deepcopy(doc)  # secretName came with KubeRay 1.6: a manifest using it needs a newer operator
    newer["spec"]["authOptions"]["secretName"] = "my-token"
    with pytest.raises(AssertionError, match="secretName"):
        _validate(newer, "rayclusters")
    bad_mode = copy.deepcopy(doc)
    bad_mode["spec"]["authOptions"]["mode"] = "on"
    with pytest.raises(AssertionError, match="mode"):
        _validate(bad_mode, "rayclusters")


def test_guide_and_manifests_require_the_kuberay_release_of_the_schema():
    required = _required_kuberay()
    assert _version(required) >= (1, 5, 1), "authOptions needs KubeRay >= 1.5.1 (backoffLimit >= 1.2)"
    assert f"KubeRay operator >= {required}" in README
    assert required in (CRD_DIR / "README.md").read_text()
    for name in ("raycluster.yaml", "rayjob.yaml"):
        header = (CLUSTER / "kuberay" / name).read_text().split("apiVersion:")[0]
        found = re.findall(r"KubeRay operator >= ([0-9.]+)", header)
        assert found == [required], f"{name} says KubeRay {found}, the guide {required}"
    stated = re.findall(r"KubeRay operator[ (]*>= ?([0-9.]+)", README)
    assert stated and set(stated) == {required}, f"the guide requires KubeRay {stated}"
    assert "deploy/" not in (CLUSTER / "kuberay" / "raycluster.yaml").read_text(), "KubeRay creates no Deployment"


def _write_stub(path: Path, body: str) -> None:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_rayjob_entrypoint_uploads_results_even_when_the_sweep_fails(tmp_path):
    (doc,) = _docs("rayjob.yaml")
    out = tmp_path / "results" / "compare"
    entrypoint = doc["spec"]["entrypoint"].replace("/home/ray/results/compare", str(out))
    assert str(out) in entrypoint
    stubs = tmp_path / "bin"
    stubs.mkdir()
    _write_stub(stubs / "flexora-tune", """import sys
from pathlib import Path
out = Path(sys.argv[sys.argv.index("--out") + 1])
out.mkdir(parents=True)
(out / "trials.csv").write_text("trial_id,status\\na,TERMINATED\\nb,ERROR\\n")
sys.exit(3)
""")
    storage = tmp_path / "bucket"
    (storage / "results").mkdir(parents=True)  # a bucket has no directories; pyarrow's local copy needs one
    env = {**os.environ, "PATH": f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "FLEXORA_STORAGE": str(storage)}
    done = subprocess.run(["sh", "-c", entrypoint], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr  # the sweep's failure is the job's (KubeRay retries it)
    assert (storage / "results" / "trials.csv").read_text().endswith("b,ERROR\n"), done.stderr


# ---- SLURM ------------------------------------------------------------------------------------------------

SRUN = """import json, os, sys
args = sys.argv[1:]
i = 0
while i < len(args) and args[i].startswith("-"):
    i += 2 if args[i] in ("-w", "-c", "-N", "-n", "--nodelist", "--gres", "--gpus-per-node") else 1
opts, cmd = args[:i], args[i:]
env = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({"prog": "srun", "opts": opts, "cmd": cmd, "env": env}) + "\\n")
node = opts[opts.index("-w") + 1] if "-w" in opts else ""
if cmd and cmd[0] in ("hostname", "nvidia-smi"):
    os.execvpe(cmd[0], cmd, {**os.environ, "STUB_NODE": node})
"""
HOSTNAME = """import json, os, sys
node = os.environ.get("STUB_NODE", "login")
ips = json.loads(os.environ["STUB_IPS"]).get(node, "")
if any(a in ("-I", "--all-ip-addresses") for a in sys.argv[1:]):
    print(ips)
elif any(a in ("-i", "--ip-address") for a in sys.argv[1:]):
    print("127.0.1.1")  # what Debian/Ubuntu's /etc/hosts maps the host name to
else:
    print(node)
"""
NVIDIA_SMI = """import os, sys
assert sys.argv[1:] == ["-L"], sys.argv
for i in range(int(os.environ.get("STUB_GPUS", "0"))):
    print(f"GPU {i}: NVIDIA A100-SXM4-80GB (UUID: GPU-{i:08d})")
"""
SCONTROL = """import os, sys
assert sys.argv[1:3] == ["show", "hostnames"] and sys.argv[3] == os.environ["SLURM_JOB_NODELIST"], sys.argv
print("\\n".join(os.environ["STUB_NODES"].split()))
"""
LOGGER = """import json, os, sys
name = os.path.basename(sys.argv[0])
if name == "python" and sys.argv[1:2] != ["-"]:
    os.execv({real!r}, [{real!r}, *sys.argv[1:]])
env = {{k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}}
stdin = sys.stdin.read() if name == "python" else ""
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({{"prog": name, "cmd": sys.argv[1:], "env": env, "stdin": stdin[:40]}}) + "\\n")
sys.exit(int(os.environ.get("STUB_RC", "0")) if name == "flexora-tune" else 0)
"""
NODES = ["gpu-a01", "gpu-a02", "gpu-a03"]
HEAD_IPS = "127.0.1.1 fe80::1c2:3ff:fe4d:5e6f 2001:db8::11 10.20.0.11 172.17.0.1"


def _run_sbatch(tmp_path: Path, slurm_env: dict[str, str], gpus_on_host: int = 0,
                head_ips: str = HEAD_IPS) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run cluster/slurm.sbatch as SLURM would on the first node, with stub srun/scontrol/hostname/nvidia-smi
    on PATH and a stub environment (python/ray/flexora-tune); returns the result and every call logged."""
    stubs, venv_bin = tmp_path / "stubs", tmp_path / "venv" / "bin"
    stubs.mkdir()
    venv_bin.mkdir(parents=True)
    for name, body in (("srun", SRUN), ("hostname", HOSTNAME), ("nvidia-smi", NVIDIA_SMI), ("scontrol", SCONTROL)):
        _write_stub(stubs / name, body)
    for name in ("python", "ray", "flexora-tune"):
        _write_stub(venv_bin / name, LOGGER.format(real=sys.executable))
    (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    log, shared = tmp_path / "calls.jsonl", tmp_path / "shared"
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path), "STUB_LOG": str(log),
           "STUB_NODES": " ".join(NODES), "STUB_IPS": json.dumps({NODES[0]: head_ips, NODES[1]: "10.20.0.12"}),
           "STUB_GPUS": str(gpus_on_host), "FLEXORA_VENV_DIR": str(tmp_path / "venv"), "SHARED_DIR": str(shared),
           "RAY_HEAD_WAIT_S": "0", "SLURM_JOB_NODELIST": "gpu-a[01-03]", "SLURM_NNODES": "3",
           "SLURM_JOB_ID": "4242", **slurm_env}
    done = subprocess.run(["bash", str(CLUSTER / "slurm.sbatch")], env=env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, calls


def _option(opts: list[str], name: str) -> str | None:
    for i, o in enumerate(opts):
        if o == name:
            return opts[i + 1]
        if o.startswith(name + "="):
            return o.split("=", 1)[1]
    return None


SITES = {
    # site, SLURM's environment in the batch step, GPUs nvidia-smi lists: (cpus, the srun GPU option, GPUs)
    "gpus-per-node": ({"SLURM_GPUS_PER_NODE": "a100:4", "SLURM_CPUS_PER_TASK": "32", "SLURM_CPUS_ON_NODE": "64",
                       "SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 4,
                      ("32", ("--gpus-per-node", "a100:4"), 4)),
    "gres": ({"SLURM_CPUS_ON_NODE": "16", "SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}, 2,
             ("16", ("--gres", "gpu:2"), 2)),
    "gres, old slurm": ({"SLURM_CPUS_PER_TASK": "24"}, 8, ("24", ("--gres", "gpu:8"), 8)),
}


@pytest.mark.parametrize("site", list(SITES))
def test_slurm_steps_get_their_cpus_gpus_and_a_routable_head_address(tmp_path, site):
    slurm_env, gpus_on_host, (cpus, (gpu_option, gpu_value), gpus) = SITES[site]
    done, calls = _run_sbatch(tmp_path, slurm_env, gpus_on_host)
    assert done.returncode == 0, done.stdout + done.stderr
    head_ip = "10.20.0.11"  # the first IPv4 that is not loopback; never 127.0.1.1 or the IPv6 addresses
    sruns = [c for c in calls if c["prog"] == "srun"]
    lookup = [c for c in sruns if c["cmd"][0] == "hostname"]
    assert len(lookup) == 1 and _option(lookup[0]["opts"], "-w") == NODES[0]
    starts = [c for c in sruns if c["cmd"][:2] == ["ray", "start"]]
    assert sorted(_option(c["opts"], "-w") for c in starts) == NODES, "one `ray start` step per node"
    for call in starts:
        opts, cmd = call["opts"], call["cmd"]
        assert _option(opts, "-c") == cpus or _option(opts, "--cpus-per-task") == cpus, call
        assert _option(opts, gpu_option) == gpu_value, call
        other = {"--gres": "--gpus-per-node", "--gpus-per-node": "--gres"}[gpu_option]
        assert _option(opts, other) is None, call
        assert f"--num-cpus={cpus}" in cmd and f"--num-gpus={gpus}" in cmd and "--block" in cmd, call
        assert call["env"]["RAY_AUTH_MODE"] == "token", call
    (head,) = [c for c in starts if "--head" in c["cmd"]]
    assert _option(head["opts"], "-w") == NODES[0] and f"--node-ip-address={head_ip}" in head["cmd"]
    workers = [c for c in starts if "--head" not in c["cmd"]]
    assert all(f"--address={head_ip}:6379" in c["cmd"] for c in workers) and len(workers) == 2
    (wait,) = [c for c in calls if c["prog"] == "python"]
    assert wait["cmd"][1:] == [f"{head_ip}:6379", "3"] and wait["env"]["RAY_AUTH_MODE"] == "token"
    (sweep,) = [c for c in calls if c["prog"] == "flexora-tune"]
    assert sweep["cmd"][:3] == ["compare", "--address", f"{head_ip}:6379"] and "--resume" in sweep["cmd"]
    assert int(_option(sweep["cmd"], "--max-failures")) >= 3 and sweep["env"]["RAY_AUTH_MODE"] == "token"
    token = Path(sweep["env"]["RAY_AUTH_TOKEN_PATH"])
    assert token.read_text().strip() and stat.S_IMODE(token.stat().st_mode) == 0o600


def test_slurm_without_gpus_stops_at_once(tmp_path):
    done, calls = _run_sbatch(tmp_path, {"SLURM_CPUS_PER_TASK": "8"}, gpus_on_host=0)
    assert done.returncode != 0 and "has no GPUs" in done.stderr and "--gres=gpu:N" in done.stderr
    assert not [c for c in calls if c["prog"] == "srun"]


def test_slurm_refuses_a_loopback_or_ipv6_only_head_address(tmp_path):
    done, calls = _run_sbatch(tmp_path, SITES["gres"][0], 2, head_ips="127.0.1.1 fe80::1 2001:db8::11")
    assert done.returncode != 0 and "RAY_HEAD_IP" in done.stderr, done.stderr
    assert not [c for c in calls if c["prog"] == "srun" and c["cmd"][:2] == ["ray", "start"]]


def test_slurm_script_parses_and_starts_ray_on_every_node():
    script = CLUSTER / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --nodes" in text and "ray start --head" in text and "ray start --address" in text
    assert "flexora-tune compare --address" in text and "--resume" in text
    assert "hostname --ip-address" not in text.replace("`hostname --ip-address`", "")


# ---- Docker, documented commands --------------------------------------------------------------------------

def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore `patterns` exclude `path` (Docker's rules for the patterns used here: `**/x`
    matches x at any depth, a pattern also excludes everything under a matching directory, `!` re-includes)."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if pattern.startswith("**/"):
            tail = pattern[3:]
            hit = any(fnmatch.fnmatchcase("/".join(parts[j:i]), tail)
                      for i in range(1, len(parts) + 1) for j in range(i))
        else:
            hit = any(fnmatch.fnmatchcase(c, pattern) for c in candidates)
        if hit:
            excluded = not negate
    return excluded


def test_docker_image_copies_the_package_and_no_credentials():
    dockerfile = (CLUSTER / "docker" / "Dockerfile").read_text()
    copies = [line.split()[1:] for line in dockerfile.splitlines() if line.startswith(("COPY", "ADD"))]
    sources = [s for args in copies for s in args[:-1] if not s.startswith("--")]
    assert sources and "." not in sources and "./" not in sources, "never copy the whole build context"
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    readme = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    assert {"pyproject.toml", readme, "flexora_tune", "scripts/setup.sh"} <= set(sources)  # what setup.sh installs
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for secret in (".git/config", ".venv/bin/python", "results/compare/trials.csv", ".env", "deploy/.env",
                   "id_rsa.pem", ".aws/credentials", "cluster/gcp-credentials.json", ".ray/auth_token",
                   "results/slurm/.ray_auth_token", "flexora_tune/__pycache__/x.pyc"):
        assert _dockerignored(secret, patterns), f".dockerignore lets {secret} into the build context"
    for needed in ("pyproject.toml", readme, "scripts/setup.sh", "flexora_tune/compare.py"):
        assert not _dockerignored(needed, patterns), f".dockerignore drops {needed}, which the image needs"


def _compare_commands() -> list[str]:
    """Every `flexora-tune compare ...` command in the cluster files, continuation lines joined."""
    texts = [p.read_text() for p in (CLUSTER / "README.md", CLUSTER / "slurm.sbatch", CLUSTER / "aws.yaml",
                                     CLUSTER / "gcp.yaml")]
    texts.append(yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())["spec"]["entrypoint"])
    commands = []
    for text in texts:
        joined = re.sub(r"\\\n\s*#?", " ", text)
        commands += [line.split("flexora-tune compare", 1)[1] for line in joined.splitlines()
                     if re.search(r"flexora-tune compare .*--[a-z]", line)]
    return commands


def test_documented_compare_options_exist():
    from flexora_tune.cli import build_parser

    parser = build_parser()
    compare = parser._subparsers._group_actions[0].choices["compare"]
    options = {o for action in compare._actions for o in action.option_strings}
    used = {word.split("=")[0] for command in _compare_commands()
            for word in re.split(r"[\s'\";]+", command) if word.startswith("--") and word != "--"}
    assert used and used <= options, f"unknown options in cluster docs: {sorted(used - options)}"


def test_cluster_sweeps_retry_trials_on_spot_nodes():
    commands = _compare_commands()
    assert len(commands) >= 6
    for command in commands:
        found = re.search(r"--max-failures[ =](-?\d+)", command)
        assert found and (int(found.group(1)) >= 3 or int(found.group(1)) == -1), f"--max-failures: {command}"
