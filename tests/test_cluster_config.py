"""cluster.yaml: valid for Ray's own cluster launcher, and the properties issue 5 asks of it.

Validation is what `ray up` runs before it talks to AWS: prepare_config (defaults, docker
checks, per-type worker limits) then validate_config (ray-schema.json + cross-field rules).
Any AWS API call fails the test, so it stays offline.
"""

from __future__ import annotations

import copy
import pathlib
import re
import tomllib

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEXT = (ROOT / "cluster.yaml").read_text()
# A key at the start of a block line ("key:", "- key:", "/path:"), outside flow mappings.
BLOCK_KEY = re.compile(r"^\s*(?:-\s+)?([A-Za-z_/][\w./-]*)\s*:(?:\s|$)")


@pytest.fixture(autouse=True)
def no_aws(monkeypatch):
    import botocore.client

    def refuse(*args, **kwargs):
        raise AssertionError("the config test must not call AWS")

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", refuse)


@pytest.fixture
def config() -> dict:
    return yaml.safe_load(TEXT)


def check(config: dict) -> dict:
    """What `ray up` does to a config before any provider call."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_ray_accepts_the_config(config):
    prepared = check(config)
    assert prepared["provider"]["type"] == "aws"
    assert set(prepared["available_node_types"]) == {"head", "cpu_worker", "gpu_worker"}


@pytest.mark.parametrize(
    "breakage, error",
    [
        (lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=0), "min_worker"),
        (lambda c: c.update(idle_timeout_minute=5), "idle_timeout_minute"),
        (lambda c: c["docker"].update(imag="x"), "imag"),
        (lambda c: c["auth"].update(ssh_usr="ubuntu"), "ssh_usr"),
        (lambda c: c["available_node_types"]["cpu_worker"].pop("resources"), "resources"),
        (lambda c: c["available_node_types"]["head"].update(resources={"CPU": -1}), "-1"),
        (lambda c: c.pop("provider"), "provider"),
        (lambda c: c.update(max_workers="many"), "many"),
    ],
    ids=["typo-in-node-type", "typo-top-level", "typo-docker", "typo-auth", "no-resources",
         "negative-resource", "no-provider", "max-workers-type"],
)  # fmt: skip
def test_ray_rejects_a_broken_config(config, breakage, error):
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, KeyError)) as info:
        check(config)
    assert error in str(info.value)


@pytest.mark.parametrize(
    "breakage, error",
    [
        (lambda c: c.update(head_node_type="nope"), "head_node_type"),
        (lambda c: c["available_node_types"]["cpu_worker"].update(min_workers=99), "max_workers"),
    ],
    ids=["unknown-head-type", "min-over-max"],
)
def test_ray_rejects_inconsistent_node_types(config, breakage, error):
    breakage(config)
    with pytest.raises(ValueError, match=error):
        check(config)


def test_head_runs_no_tasks_and_gpu_workers_scale_from_zero(config):
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1
    assert gpu[0]["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4", "p5"))
    cpu = types["cpu_worker"]
    assert cpu["resources"]["CPU"] > 0 and "GPU" not in cpu["resources"]
    assert cpu["node_config"]["InstanceType"].startswith(("m6i.", "c6i.", "m7i.", "c7i."))
    for name, t in types.items():
        if name != config["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], name
    assert config["idle_timeout_minutes"] > 0


def test_images_pin_the_installed_ray_and_python(config):
    python = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert ">=3.11,<3.12" in python
    docker = config["docker"]
    cpu_images = {docker["image"], docker["head_image"], docker["worker_image"]}
    gpu_image = config["available_node_types"]["gpu_worker"]["docker"]["worker_image"]
    assert cpu_images == {f"rayproject/ray:{ray.__version__}-py311-cpu"}
    assert gpu_image == f"rayproject/ray:{ray.__version__}-py311-gpu"


def test_setup_installs_the_synced_project_with_faiss_gpu(config):
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "faiss-gpu" in extras["optional-dependencies"]["gpu"][0]
    (remote,) = [r for r, local in config["file_mounts"].items() if local == "."]
    assert config["setup_commands"] == [f"pip install --no-cache-dir -e '{remote}[gpu]'"]
    assert ".gitignore" in config["rsync_filter"]  # never ship .venv or .cache


def test_every_node_starts_ray_with_the_serve_data_plane(config):
    from visual_search import cluster

    exports = " ".join(f"{key}={value}" for key, value in cluster.SERVE_ENV.items())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        assert f"export {exports};" in start, key
        assert start.index("export") < start.index("ray start")


def test_iam_profiles_and_no_credentials(config):
    for name, t in config["available_node_types"].items():
        profile = t["node_config"]["IamInstanceProfile"]
        assert set(profile) <= {"Name", "Arn"} and len(profile) == 1, name
    assert config["provider"]["region"] and config["provider"]["availability_zone"]
    assert config["auth"]["ssh_user"] == "ubuntu"
    lowered = TEXT.lower()
    for secret in ("aws_access_key", "aws_secret", "secret_access_key", "session_token"):
        assert secret not in lowered
    assert not re.search(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b", TEXT)  # an access key id


def _keys(node) -> set[str]:
    if isinstance(node, dict):
        return {str(k) for k in node} | {k for v in node.values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()


def test_every_key_has_a_comment(config):
    commented, missing = [], []
    for number, line in enumerate(TEXT.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        code, sep, _ = line.partition(" #")
        if sep:
            commented.append(code)
        if BLOCK_KEY.match(line) and not sep:
            missing.append(f"{number}: {line}")
    assert not missing, "keys without a comment:\n" + "\n".join(missing)
    # The scan sees every key YAML sees (flow mappings too), each on a commented line.
    for key in _keys(config):
        pattern = re.compile(rf"(^|[\s{{,\"'-]){re.escape(key)}\"?\s*:")
        assert any(pattern.search(code) for code in commented), key


def test_ray_runs_with_token_auth_and_a_loopback_dashboard(config):
    """A fresh head would start with auth off; every node asks for the shared token, which the
    launcher copies from the user's machine, and the job API is reachable only through SSH."""
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        assert "export RAY_AUTH_MODE=token;" in start, key
        assert "test -s ~/.ray/auth_token && ray start" in start, key
    (head,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
