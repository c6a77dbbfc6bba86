"""cluster.yaml: valid for Ray's own cluster launcher, and private by construction.

Guards against: a config `ray up` rejects only after minutes of cloud calls; the dashboard / Jobs
API (8265), GCS (6379) or Ray Client (10001) opened to 0.0.0.0/0, which is remote code execution
for anyone scanning for Ray; our start commands silently replaced by Ray's AWS defaults (which bind
the dashboard to 0.0.0.0); token auth switched off; the head losing the boto3 install that Ray's
defaults carry (the autoscaler then cannot launch workers); a YAML ` #` cutting a command short.

Ray's validation is run offline only: `prepare_config` (defaults merge) and `validate_config`
(JSON schema + cross-field checks) need neither boto3 nor credentials. The AWS bootstrap step
(`ray.autoscaler._private.aws.config.bootstrap_aws`: key pair, IAM role, security group, AMI and
instance-type lookups) and `fillout_available_node_types_resources` call AWS through boto3, so
they are not called here."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")  # PyYAML: a dependency of ray, so normally present

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
PRIVATE_PORTS = {8265: "dashboard / Jobs API", 6379: "GCS", 10001: "Ray Client"}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as e:  # an internal module: moved in some Ray release
        pytest.skip(f"Ray's cluster-config validation is not importable here: {e}")
    pytest.importorskip("jsonschema")
    validate_config(raw)               # the file as written
    cfg = prepare_config(raw)          # merged with Ray's AWS defaults, as `ray up` does first
    validate_config(cfg)
    return cfg


def test_ray_accepts_the_config(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_node_types_and_autoscaling_bounds(prepared):
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    workers = {k: v for k, v in types.items() if k != prepared["head_node_type"]}
    assert workers and all(v["resources"].get("GPU", 0) >= 1 for v in workers.values())
    for v in workers.values():
        assert 0 <= v["min_workers"] <= v["max_workers"] <= prepared["max_workers"]
    # A missing ImageId makes Ray fall back to its 2021 CUDA 11.2 DLAMI, too old for torch 2.13.
    assert all(v["node_config"].get("ImageId") for v in types.values())


def _exposes(rule: dict, port: int) -> bool:
    cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + \
            [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
    if not {"0.0.0.0/0", "::/0"} & set(cidrs):
        return False
    if str(rule.get("IpProtocol")) == "-1":
        return True  # all protocols, all ports
    lo, hi = rule.get("FromPort", 0), rule.get("ToPort", 65535)
    return lo in (-1, None) or lo <= port <= hi


def _open_ports(cfg: dict) -> list[str]:
    rules = cfg["provider"].get("security_group", {}).get("IpPermissions", [])
    return [f"{what} port {port}" for port, what in PRIVATE_PORTS.items() if any(_exposes(r, port) for r in rules)]


def test_raw_file_opens_no_ray_port_to_the_internet(raw):
    """Guards against the dashboard / GCS / Ray Client ports opened to 0.0.0.0/0 in the file as
    written. Reads the YAML only, so it runs whatever Ray's private modules are called."""
    assert _open_ports(raw) == []
    # The rule checker itself: these must count as exposed.
    assert _exposes({"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 9000,
                     "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, 8265)
    assert _exposes({"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}, 6379)
    assert not _exposes({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                         "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, 8265)
    assert _open_ports({"provider": {"security_group": {"IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}}}) \
        == ["dashboard / Jobs API port 8265"]


def test_raw_file_keeps_dashboard_on_loopback_and_token_auth_on(raw):
    """Guards against the file as written binding the dashboard beyond loopback or turning token
    auth off; YAML only (no Ray import), so a Ray upgrade cannot skip it."""
    head = " ".join(raw["head_start_ray_commands"])
    start = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    assert len(start) == 2
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert all("RAY_AUTH_MODE=token" in c for c in start), "every node must agree on token auth"
    assert "RAY_AUTH_MODE=disabled" not in yaml.safe_dump(raw)  # values only, not the comments
    assert raw["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_ray_ports_not_opened_after_ray_defaults_merge(prepared):
    """Guards against Ray's AWS defaults, merged in by `ray up`, opening a Ray port."""
    assert _open_ports(prepared) == []


def test_dashboard_on_loopback_and_token_auth_on(raw, prepared):
    """Guards against Ray's AWS defaults (which bind the dashboard to 0.0.0.0) winning over our start commands."""
    head = " ".join(prepared["head_start_ray_commands"])
    start = [c for c in prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]
             if "ray start" in c]
    assert len(start) == 2
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in head  # Ray's AWS defaults use --dashboard-host=0.0.0.0: ours must win
    assert all("RAY_AUTH_MODE=token" in c for c in start), "every node must agree on token auth"
    assert "RAY_AUTH_MODE=disabled" not in yaml.safe_dump(raw)  # values only, not the comments
    assert prepared["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    version = re.search(r"ray\[default\]==(\d+)\.(\d+)", " ".join(prepared["setup_commands"]))
    assert version and (int(version[1]), int(version[2])) >= (2, 52), "token auth needs Ray >= 2.52"


def test_setup_installs_the_project_with_the_torch_pin(prepared):
    assert prepared["file_mounts"]["~/nanogrpo"] == "."
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged into both
        cmds = prepared[key]
        assert any('pip install' in c and '"torch==2.13.0"' in c and "-e ~/nanogrpo" in c for c in cmds), key
    assert any("boto3" in c for c in prepared["head_setup_commands"]), "the head autoscaler needs boto3"
    excludes = prepared["rsync_exclude"]
    assert "runs/" in excludes and {".venv/", "venv/"} <= set(excludes)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash to syntax-check the commands")
def test_every_command_is_valid_bash(prepared):
    keys = ["initialization_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    for cmd in (c for k in keys for c in prepared[k]):
        r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert r.returncode == 0, f"{cmd!r}: {r.stderr}"
