"""`selfhost deploy kuberay`: the RayService manifest validates against KubeRay's published CRD schema."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from selfhost.cluster.config import ClusterConfig
from selfhost.cluster.kuberay import rayservice_manifest, to_yaml
from selfhost.errors import InvalidParameterError

SCHEMA = Path(__file__).parent / "fixtures" / "rayservice_v1_schema.json"  # source: fixtures/SOURCE.md


def _strict(schema):
    """Close every object that lists its properties, as `kubectl apply --validate=strict` does."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def validator():
    return jsonschema.Draft7Validator(_strict(json.loads(SCHEMA.read_text())))


def _cli_manifest(tmp_path, *args) -> dict:
    out = tmp_path / "rayservice.yaml"
    subprocess.run([sys.executable, "-m", "selfhost.cli", "deploy", "kuberay", *args, "-o", str(out)],
                   check=True, timeout=120, capture_output=True)
    return yaml.safe_load(out.read_text())


def test_cli_manifest_validates_and_carries_the_app(tmp_path, validator):
    manifest = _cli_manifest(tmp_path, "Qwen/Qwen2.5-0.5B-Instruct", "--replicas", "3", "--cpus-per-replica", "4")
    errors = [e.message for e in validator.iter_errors(manifest)]
    assert not errors, errors
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    app = serve_config["applications"][0]
    assert app["import_path"] == "selfhost.cluster.app:build_app"
    assert app["args"]["server"]["models"] == ["Qwen/Qwen2.5-0.5B-Instruct"]
    assert ClusterConfig.from_dict(app["args"]["cluster"]).replicas == 3
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert workers["replicas"] == workers["maxReplicas"] == 3
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "4"


def test_autoscaled_gpu_manifest_validates(validator):
    cluster = ClusterConfig(autoscale=(1, 4), gpus_per_replica=1, cpus_per_replica=0.5)
    manifest = yaml.safe_load(to_yaml(rayservice_manifest("m", cluster, pip=["selfhost[ray]"])))
    assert not list(validator.iter_errors(manifest))
    spec = manifest["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is True
    limits = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "500m", "memory": "8Gi", "nvidia.com/gpu": 1}


def test_schema_check_is_strict(validator):
    """The same check refuses a misspelt field and a wrong type, so a pass above means something."""
    manifest = rayservice_manifest("m", ClusterConfig())
    typo = copy.deepcopy(manifest)
    typo["spec"]["rayClusterConfig"]["workerGroupSpec"] = typo["spec"]["rayClusterConfig"].pop("workerGroupSpecs")
    assert list(validator.iter_errors(typo))
    wrong_type = copy.deepcopy(manifest)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "three"
    assert list(validator.iter_errors(wrong_type))


def test_the_manifests_app_builds():
    pytest.importorskip("ray")
    from selfhost.cluster.app import build_app

    serve_config = yaml.safe_load(rayservice_manifest("m", ClusterConfig(replicas=2))["spec"]["serveConfigV2"])
    app = build_app(serve_config["applications"][0]["args"])  # what KubeRay's Serve controller calls
    assert type(app).__name__ == "Application"


@pytest.mark.parametrize("kwargs", [{"memory_per_replica": "8"}, {"name": "Bad_Name"}])
def test_bad_manifest_settings(kwargs):
    with pytest.raises(InvalidParameterError):
        rayservice_manifest("m", ClusterConfig(), **kwargs)
