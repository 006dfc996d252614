"""cluster.yaml, infra/aws and infra/k8s: valid for the tools that consume them, and in step with
pyproject.toml and docs/operations.md."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent


def load_yaml(rel: str):
    return list(yaml.safe_load_all((ROOT / rel).read_text()))


def pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        m = re.match(r"([a-zA-Z0-9_-]+)(\[[^\]]*\])?==([0-9.]+)", dep)
        if m:
            out[m.group(1)] = m.group(3)
    return out


def test_cluster_yaml_validates_against_rays_own_schema():
    path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    schema = json.load(open(path))
    config = load_yaml("cluster.yaml")[0]
    jsonschema.validate(config, schema)
    with pytest.raises(jsonschema.ValidationError):  # the schema does bite
        jsonschema.validate({**config, "max_workers": "many"}, schema)


def test_cluster_yaml_matches_the_project_versions():
    config = load_yaml("cluster.yaml")[0]
    python = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    py_tag = "py" + python.removeprefix(">=").replace(".", "")
    assert pins()["ray"] == ray.__version__ == "2.60.0"
    images = [config["docker"]["image"], config["docker"]["head_image"],
              config["docker"]["worker_image"]]
    images += [t["docker"]["worker_image"] for t in config["available_node_types"].values()
               if "docker" in t]
    for image in images:
        assert image.startswith(f"rayproject/ray:{pins()['ray']}-{py_tag}"), image
    setup = " ".join(config["setup_commands"])
    assert f"torch=={pins()['torch']}" in setup and "pip install -q -e /home/ray/" in setup
    assert config["file_mounts"]["/home/ray/fooling-linear"] == "."


def test_cluster_yaml_is_safe_and_scales():
    config = load_yaml("cluster.yaml")[0]
    text = (ROOT / "cluster.yaml").read_text()
    assert "aws_access_key" not in text.lower() and "AKIA" not in text  # roles, never keys
    head = config["available_node_types"][config["head_node_type"]]
    assert "IamInstanceProfile" in head["node_config"]
    starts = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts  # reachable only through `ray dashboard`
    workers = {k: v for k, v in config["available_node_types"].items()
               if k != config["head_node_type"]}
    assert any("g5" in v["node_config"]["InstanceType"] for v in workers.values())  # GPU type
    for node in workers.values():
        assert 0 <= node["min_workers"] <= node["max_workers"] <= config["max_workers"]
        assert "IamInstanceProfile" in node["node_config"]


def test_every_node_starts_ray_with_token_auth_and_the_file_holds_no_token():
    """Head and workers start with RAY_AUTH_MODE=token and a token file that file_mounts copies
    from the operator's machine (outside the checkout); no token is written in cluster.yaml."""
    config = load_yaml("cluster.yaml")[0]
    text = (ROOT / "cluster.yaml").read_text()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts, key
        for command in starts:
            env = dict(re.findall(r"\b(RAY_AUTH_\w+)=(\S+?);?(?=\s)",
                                  command[: command.index("ray start")]))
            assert env.get("RAY_AUTH_MODE") == "token", command
            assert "RAY_AUTH_TOKEN" not in env, command  # the token itself: never in the file
            local = config["file_mounts"][env["RAY_AUTH_TOKEN_PATH"]]
            assert local.startswith("~/"), local  # the operator's file, not the synced checkout
    assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]", text)
    assert not re.search(r"[0-9a-fA-F]{32,}|[A-Za-z0-9+/]{40,}", text)  # hex or base64 secrets
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert "ray get-auth-token --generate" in operations and "RAY_AUTH_MODE=token" in operations


def test_cloudformation_template_passes_cfn_lint():
    lint = shutil.which("cfn-lint", path=os.path.dirname(sys.executable)) or shutil.which(
        "cfn-lint")
    assert lint, "cfn-lint is a dev dependency (pyproject.toml)"
    proc = subprocess.run([lint, str(ROOT / "infra/aws/storage.yaml")], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def load_cloudformation(rel: str = "infra/aws/storage.yaml") -> dict:
    class Loader(yaml.SafeLoader):  # CloudFormation's short tags (!Ref, !Sub, !GetAtt)
        pass

    def short_tag(loader, suffix, node):
        if isinstance(node, yaml.ScalarNode):
            return f"!{suffix} {loader.construct_scalar(node)}"
        if isinstance(node, yaml.SequenceNode):
            return [f"!{suffix}", *loader.construct_sequence(node, deep=True)]
        return {f"!{suffix}": loader.construct_mapping(node, deep=True)}

    Loader.add_multi_constructor("!", short_tag)
    return yaml.load((ROOT / rel).read_text(), Loader=Loader)


def test_cloudformation_bucket_is_private_encrypted_and_tls_only():
    template = load_cloudformation()
    res = template["Resources"]
    bucket = res["ResultsBucket"]["Properties"]
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert bucket["LifecycleConfiguration"]["Rules"]
    deny = res["ResultsBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"][0]
    assert deny["Effect"] == "Deny" and deny["Condition"]["Bool"]["aws:SecureTransport"] == "false"
    statements = res["BucketAccessPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    for s in statements:  # S3 rights on this bucket only, never s3:*
        assert all(a.startswith("s3:") and a != "s3:*" for a in s["Action"])
        assert "ResultsBucket" in str(s["Resource"]) and s["Resource"] != "*"


def test_kuberay_manifest_runs_the_documented_commands():
    docs = {d["kind"]: d for d in load_yaml("infra/k8s/rayjob.yaml")}
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == pins()["ray"]
    groups = {g["groupName"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert groups == {"cpu", "gpu"}
    script = shlex.split(job["spec"]["entrypoint"])[-1]
    commands = [c.strip() for c in script.split(";") if c.strip().startswith("python -m")]
    assert [c.split()[2] for c in commands] == ["pipelines.ingest", "training.train",
                                                "attacks.fool"]
    operations = (ROOT / "docs" / "operations.md").read_text()
    for command in commands:
        assert command in operations, command
    assert docs["ServiceAccount"]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]


def test_cluster_names_a_security_group_open_to_a_given_range_only():
    """Ray creates a group with SSH open to 0.0.0.0/0 unless cluster.yaml names one; the one
    named is the template's, whose SSH range is a parameter without a default."""
    config = load_yaml("cluster.yaml")[0]
    template = load_cloudformation()
    prefix = template["Parameters"]["NamePrefix"]["Default"]
    group = template["Resources"]["ClusterSecurityGroup"]["Properties"]
    assert group["GroupName"] == "!Sub ${NamePrefix}-nodes"
    assert config["provider"]["security_group"] == {"GroupName": f"{prefix}-nodes"}
    assert "IpPermissions" not in config["provider"]["security_group"]  # Ray would add its own
    assert "Default" not in template["Parameters"]["SshIngressCidr"]
    [ssh] = group["SecurityGroupIngress"]
    assert ssh["CidrIp"] == "!Ref SshIngressCidr" and (ssh["FromPort"], ssh["ToPort"]) == (22, 22)
    assert "0.0.0.0/0" not in json.dumps(template["Resources"])
    pattern = re.compile(template["Parameters"]["SshIngressCidr"]["AllowedPattern"])
    assert pattern.match("203.0.113.7/32") and not pattern.match("0.0.0.0")


def test_the_head_tags_only_at_launch_or_its_own_instances_never_the_cluster_tag():
    """CreateTags on any instance would let the head give another instance the cluster's tag,
    and so stop or terminate it under the tag condition."""
    res = load_cloudformation()["Resources"]
    [policy] = res["HeadRole"]["Properties"]["Policies"]
    statements = policy["PolicyDocument"]["Statement"]
    cluster = load_yaml("cluster.yaml")[0]["cluster_name"]
    tagging = [s for s in statements if "ec2:CreateTags" in (
        s["Action"] if isinstance(s["Action"], list) else [s["Action"]])]
    assert tagging
    for s in tagging:
        cond = s.get("Condition", {})
        at_launch = cond.get("StringEquals", {}).get("ec2:CreateAction") == "RunInstances"
        own = (cond.get("StringEquals", {}).get("ec2:ResourceTag/ray-cluster-name") == cluster
               and cond.get("ForAllValues:StringNotEquals", {}).get("aws:TagKeys")
               == ["ray-cluster-name"])
        assert at_launch or own, s
        assert s["Resource"] != "*"
    stop = next(s for s in statements if "ec2:TerminateInstances" in s["Action"])
    assert stop["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == cluster


def test_kuberay_dashboard_on_the_pod_network_requires_a_token():
    job = {d["kind"]: d for d in load_yaml("infra/k8s/rayjob.yaml")}["RayJob"]
    spec = job["spec"]["rayClusterSpec"]
    host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host", "127.0.0.1")
    assert host == "127.0.0.1" or spec["authOptions"]["mode"] == "token"
