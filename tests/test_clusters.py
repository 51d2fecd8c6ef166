"""Static checks of the cluster configs in clusters/: schema, scaling, security, paths, comments.

Nothing here starts Ray or talks to a cloud or to Kubernetes: the launcher YAMLs are validated with
Ray's own JSON schema (the same check `ray up` runs before it contacts a provider), the KubeRay
manifests are parsed with PyYAML, and everything else is text inspection.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTERS = REPO / "clusters"

LAUNCHER_FILES = ["aws.yaml", "gcp.yaml"]
MANIFEST_FILES = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"]
YAML_FILES = LAUNCHER_FILES + MANIFEST_FILES
ALL_FILES = YAML_FILES + ["README.md"]

# The only scripts and configs a cluster file may point at (all live in this repository).
ALLOWED_REPO_PATHS = {
    "workflows/train.py",
    "workflows/sweep.py",
    "workflows/make_tiny_model.py",
    "configs/default.yaml",
    "configs/sweep.yaml",
}
REPO_PATH_PATTERN = re.compile(r"(?:workflows/[\w./-]+?\.py|configs/[\w./-]+?\.yaml)\b")

# Ray's dashboard / job API, GCS and client-server ports: never reachable from the internet.
RAY_PORTS = (8265, 6379, 10001)
WORLD_CIDRS = {"0.0.0.0/0", "::/0"}
SWEEP_ENTRYPOINT = "python workflows/sweep.py --config configs/sweep.yaml"
PROJECT_INSTALL = "pip install -c constraints.txt -e ."

# A YAML line that defines a mapping key: optional list dashes, then a plain or quoted key and ':'.
KEY_LINE_PATTERN = re.compile(r"""^\s*(?:-\s+)*(?:"[^"]*"|'[^']*'|[^\s#'"{\[-][^#]*?)\s*:(?:\s|$)""")
# The end of a line that opens a block scalar (`key: |`, `- >-`, `key: |2` ...).
BLOCK_SCALAR_PATTERN = re.compile(r"(?:^|[\s:-])[|>][0-9+-]*$")


def read_text(name: str) -> str:
    """Return the text of one file in clusters/."""
    return (CLUSTERS / name).read_text(encoding="utf-8")


def load_launcher_config(name: str) -> dict:
    """Load one Ray cluster launcher YAML as a dict."""
    return yaml.safe_load(read_text(name))


def load_manifests(name: str) -> list[dict]:
    """Load every (non-empty) document of a Kubernetes manifest file."""
    return [doc for doc in yaml.safe_load_all(read_text(name)) if doc]


def find_manifest(name: str, kind: str) -> dict:
    """Return the single document of the given kind in a manifest file."""
    matches = [doc for doc in load_manifests(name) if doc.get("kind") == kind]
    assert len(matches) == 1, f"{name}: expected exactly one {kind}, found {len(matches)}"
    return matches[0]


def split_trailing_comment(line: str) -> tuple[str, str]:
    """Split a YAML line into (content, comment), ignoring '#' inside quotes or glued to a word."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index], line[index:]
    return line, ""


def indentation(line: str) -> int:
    """Return the number of leading spaces of a line."""
    return len(line) - len(line.lstrip(" "))


def find_uncommented_keys(text: str) -> list[str]:
    """List 'line N: ...' for every mapping-key line without a trailing or directly preceding comment.

    Lines inside block scalars (`key: |` / `- >-` bodies such as shell commands or an embedded
    runtime-env YAML) are skipped; they are string contents, not keys of this document.
    """
    problems = []
    lines = text.splitlines()
    block_indent = None
    for number, line in enumerate(lines, start=1):
        if block_indent is not None:
            if not line.strip() or indentation(line) > block_indent:
                continue
            block_indent = None
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped in ("---", "..."):
            continue
        content, comment = split_trailing_comment(line)
        content = content.rstrip()
        if KEY_LINE_PATTERN.match(content):
            previous = lines[number - 2].strip() if number > 1 else ""
            if not comment and not previous.startswith("#"):
                problems.append(f"line {number}: {stripped}")
        if BLOCK_SCALAR_PATTERN.search(content):
            block_indent = indentation(line)
    return problems


def find_world_open_ports(rule: dict) -> list[str]:
    """Describe which of Ray's ports an EC2 ingress rule opens to the whole internet (empty if none)."""
    cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])}
    cidrs |= {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
    if not cidrs & WORLD_CIDRS:
        return []
    if str(rule.get("IpProtocol")) == "-1":
        return ["all ports"]
    low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
    if low == -1 or high == -1:
        return ["all ports"]
    return [str(port) for port in RAY_PORTS if low <= port <= high]


def read_constraint_pins() -> dict[str, str]:
    """Return {package: version} for every `name==version` line of constraints.txt."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def read_project_dependencies() -> dict[str, str]:
    """Return {package: requirement} for the [project] dependencies of pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    deps = {}
    for requirement in project["dependencies"]:
        name = re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower()
        deps[name] = requirement
    return deps


def collect_ray_cluster_specs() -> list[tuple[str, dict]]:
    """Return (label, spec) for the RayCluster spec and the RayJob's rayClusterSpec."""
    cluster = find_manifest("kuberay-raycluster.yaml", "RayCluster")
    job = find_manifest("kuberay-rayjob.yaml", "RayJob")
    return [("RayCluster.spec", cluster["spec"]), ("RayJob.spec.rayClusterSpec", job["spec"]["rayClusterSpec"])]


def collect_start_commands(config: dict) -> list[str]:
    """Return every head/worker start command of a launcher config."""
    return list(config.get("head_start_ray_commands", [])) + list(config.get("worker_start_ray_commands", []))


# --- Ray cluster launcher configs -------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_passes_ray_schema(name):
    """The file as written, and after Ray fills in its provider defaults, validates against ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_launcher_config(name)
    validate_config(copy.deepcopy(config))
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", LAUNCHER_FILES)
@pytest.mark.parametrize("breakage", ["unknown_top_level_key", "string_min_workers"])
def test_schema_validator_rejects_broken_copy(name, breakage):
    """A deliberately broken copy fails validation, so the schema check above is not vacuous."""
    from ray.autoscaler._private.util import validate_config

    config = load_launcher_config(name)
    if breakage == "unknown_top_level_key":
        config["not_a_ray_setting"] = True
    else:
        worker_type = next(t for t in config["available_node_types"] if t != config["head_node_type"])
        config["available_node_types"][worker_type]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_gpu_workers_scale_from_zero_and_head_has_no_gpu(name):
    """GPU worker types start at 0 nodes with a sensible ceiling; the head node type has no GPU."""
    config = load_launcher_config(name)
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head must not advertise GPUs"
    assert "guestAccelerators" not in head["node_config"], "the head must not attach GPUs"
    head_instance = head["node_config"].get("InstanceType") or head["node_config"].get("machineType")
    assert not re.match(r"^(g\d|p\d|a\d-|a2|a3|g2)", head_instance), f"head uses a GPU machine: {head_instance}"

    gpu_types = {key: t for key, t in node_types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker type defined"
    for key, node_type in gpu_types.items():
        assert node_type["min_workers"] == 0, f"{key}: GPU workers must scale up from zero"
        assert 1 <= node_type["max_workers"] <= config["max_workers"] <= 16, f"{key}: unreasonable max_workers"
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_installs_project_with_constraints(name):
    """The repo is mounted at ~/dpo-ray and installed with the torch/ray pins on head and workers."""
    config = load_launcher_config(name)
    assert config["file_mounts"].get("~/dpo-ray") == "."
    for section in ("head_setup_commands", "worker_setup_commands"):
        commands = config[section]
        assert any("cd ~/dpo-ray" in c and PROJECT_INSTALL in c for c in commands), f"{section} lacks the install"


@pytest.mark.parametrize("name", YAML_FILES)
def test_file_starts_with_run_command(name):
    """The first line says how to run the file."""
    first_line = read_text(name).splitlines()[0]
    expected = f"# ray up clusters/{name}" if name in LAUNCHER_FILES else f"# kubectl apply -f clusters/{name}"
    assert first_line.startswith(expected)


# --- KubeRay manifests --------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind", [("kuberay-raycluster.yaml", "RayCluster"), ("kuberay-rayjob.yaml", "RayJob")])
def test_manifest_kind_and_api_version(name, kind):
    """Each manifest holds its custom resource under the ray.io/v1 API."""
    resource = find_manifest(name, kind)
    assert resource["apiVersion"] == "ray.io/v1"
    assert resource["metadata"]["name"]


@pytest.mark.parametrize("label, spec", collect_ray_cluster_specs(), ids=["RayCluster", "RayJob"])
def test_ray_cluster_spec_autoscales_gpu_workers_from_zero(label, spec):
    """Autoscaler on, CPU-free head, a GPU worker group from 0 replicas with nvidia.com/gpu limits."""
    assert spec["enableInTreeAutoscaling"] is True, label
    options = spec["autoscalerOptions"]
    assert options["idleTimeoutSeconds"] > 0 and options["upscalingMode"] in {"Default", "Aggressive", "Conservative"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", f"{label}: head must run no training"

    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if int(limits.get("nvidia.com/gpu", 0)) > 0:
            gpu_groups.append(group)
    assert gpu_groups, f"{label}: no worker group with nvidia.com/gpu limits"
    for group in gpu_groups:
        assert group["minReplicas"] == 0 and group["replicas"] == 0, f"{label}: GPU group must start at zero"
        assert 1 <= group["maxReplicas"] <= 16


def test_rayjob_runs_sweep_and_cleans_up():
    """The RayJob runs the sweep entrypoint and deletes its cluster afterwards."""
    spec = find_manifest("kuberay-rayjob.yaml", "RayJob")["spec"]
    assert spec["entrypoint"] == SWEEP_ENTRYPOINT
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert "rayClusterSpec" in spec
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]


def test_rayjob_runtime_env_matches_project_dependencies():
    """The RayJob's pip list covers pyproject's dependencies (minus ray, in the image) with the repo's pins."""
    spec = find_manifest("kuberay-rayjob.yaml", "RayJob")["spec"]
    packages = yaml.safe_load(spec["runtimeEnvYAML"])["pip"]["packages"]
    by_name = {re.split(r"[<>=!~]", p, maxsplit=1)[0].lower(): p for p in packages}
    pins = read_constraint_pins()
    for name, requirement in read_project_dependencies().items():
        if name == "ray":
            continue
        expected = f"{name}=={pins[name]}" if name in pins else requirement
        assert by_name.get(name) == expected, f"runtime env pip entry for {name}: want {expected!r}"


# --- security -------------------------------------------------------------------------------------


def test_aws_security_group_allows_only_ssh_from_operator_cidr():
    """The AWS security group opens only tcp/22 to a CIDR, and never Ray's ports to the internet."""
    provider = load_launcher_config("aws.yaml")["provider"]
    rules = provider["security_group"]["IpPermissions"]
    assert rules, "the security group needs the SSH rule"
    for rule in rules:
        assert find_world_open_ports(rule) == [], f"rule opens Ray ports to the internet: {rule}"
        if rule.get("IpRanges") or rule.get("Ipv6Ranges"):
            assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22), rule
            for cidr in [r["CidrIp"] for r in rule.get("IpRanges", [])]:
                assert cidr not in WORLD_CIDRS


@pytest.mark.parametrize("name", ALL_FILES)
def test_no_file_opens_anything_to_the_internet(name):
    """No cluster file contains a world-open CIDR at all."""
    text = read_text(name)
    for cidr in WORLD_CIDRS:
        assert cidr not in text, f"{name} mentions {cidr}"


def test_gcp_nodes_use_firewalled_network():
    """GCP nodes sit on the dedicated subnet and carry the tag the README's firewall rules target."""
    config = load_launcher_config("gcp.yaml")
    for key, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        assert "dpo-ray" in node_config["tags"]["items"], key
        subnets = [nic["subnetwork"] for nic in node_config["networkInterfaces"]]
        assert subnets and all(s.endswith("/subnetworks/dpo-ray-subnet") for s in subnets), key


def test_readme_gcp_firewall_admits_only_ssh_from_a_cidr():
    """Every README firewall rule with a source range allows tcp:22 only."""
    rule_lines = [line for line in read_text("README.md").splitlines() if "firewall-rules create" in line]
    assert rule_lines, "README must show the GCP firewall rules"
    for line in rule_lines:
        if "--source-ranges" in line:
            assert "--allow=tcp:22 " in line + " ", line
            assert not any(str(port) in line for port in RAY_PORTS), line


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_starts_ray_with_token_auth_and_private_dashboard(name):
    """Every `ray start` runs with RAY_AUTH_MODE=token, and the dashboard binds to loopback only."""
    config = load_launcher_config(name)
    start_commands = [c for c in collect_start_commands(config) if "ray start" in c]
    assert len(start_commands) >= 2, "expected head and worker start commands"
    for command in start_commands:
        assert "RAY_AUTH_MODE=token" in command, command
        assert "RAY_AUTH_TOKEN_PATH=" in command, command
    head_command = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head_command
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", "nodes need the shared token"


@pytest.mark.parametrize("name", ALL_FILES)
def test_every_file_that_starts_ray_enables_token_auth(name):
    """Any file that contains `ray start` or a RayCluster spec also turns token auth on."""
    text = read_text(name)
    if name in MANIFEST_FILES:
        # KubeRay runs `ray start` itself; authOptions makes it do so with a token.
        assert re.search(r"authOptions:\s*\n(?:\s*#.*\n)*\s*mode: token", text), name
    elif "ray start" in text:
        assert "RAY_AUTH_MODE=token" in text, name


@pytest.mark.parametrize("label, spec", collect_ray_cluster_specs(), ids=["RayCluster", "RayJob"])
def test_ray_cluster_spec_is_private_and_authenticated(label, spec):
    """Token auth is on and the head Service stays cluster-internal."""
    assert spec["authOptions"]["mode"] == "token", label
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") not in {"LoadBalancer", "NodePort"}, label


@pytest.mark.parametrize("name", MANIFEST_FILES)
def test_manifests_expose_nothing_outside_the_cluster(name):
    """No Service of type LoadBalancer/NodePort and no Ingress ride along in the manifests."""
    for doc in load_manifests(name):
        assert doc["kind"] != "Ingress", name
        if doc["kind"] == "Service":
            assert doc.get("spec", {}).get("type", "ClusterIP") not in {"LoadBalancer", "NodePort"}, name


# --- paths, pins and documentation --------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_FILES)
def test_referenced_paths_are_known(name):
    """Every workflows/*.py or configs/*.yaml path mentioned is one of the project's entry points."""
    for path in REPO_PATH_PATTERN.findall(read_text(name)):
        assert path in ALLOWED_REPO_PATHS, f"{name} references unknown {path}"


def test_referenced_paths_exist():
    """Every referenced script/config exists in the repository."""
    referenced = {path for name in ALL_FILES for path in REPO_PATH_PATTERN.findall(read_text(name))}
    assert referenced, "the cluster files should reference the sweep entry point"
    missing = sorted(path for path in referenced if not (REPO / path).is_file())
    assert not missing, f"referenced but missing: {missing}"


@pytest.mark.parametrize("name", ALL_FILES)
def test_version_pins_match_constraints(name):
    """Any `pkg==version` for a package pinned in constraints.txt uses the same version."""
    pins = read_constraint_pins()
    for package, version in re.findall(r"\b([A-Za-z][\w.-]*)==([0-9][\w.]*)", read_text(name)):
        if package.lower() in pins:
            assert version == pins[package.lower()], f"{name}: {package}=={version} vs constraints.txt"


def test_readme_documents_access_and_auth():
    """The README covers launch, tunnel, submit, teardown, KubeRay, and token handling."""
    text = read_text("README.md")
    for snippet in (
        "ray up clusters/aws.yaml",
        "ray dashboard clusters/aws.yaml",
        "ray job submit --address http://127.0.0.1:8265 --working-dir . -- " + SWEEP_ENTRYPOINT,
        "ray down clusters/aws.yaml",
        "kubectl apply -f clusters/kuberay-raycluster.yaml",
        "kubectl apply -f clusters/kuberay-rayjob.yaml",
        "kubectl port-forward svc/",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "~/.ray/auth_token",
    ):
        assert snippet in text, f"README lacks {snippet!r}"


# --- every key commented ------------------------------------------------------------------------


@pytest.mark.parametrize("name", YAML_FILES)
def test_every_key_is_commented(name):
    """Each mapping key has a trailing comment or a comment line directly above it."""
    problems = find_uncommented_keys(read_text(name))
    assert not problems, f"{name}: uncommented keys:\n" + "\n".join(problems)
