"""The KubeRay example (``deploy/rayservice.yaml``): a RayService whose Serve config Ray accepts,
whose application builds from its import path and arguments, and whose pods can hold it."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

MANIFEST = Path(__file__).parents[2] / "deploy" / "rayservice.yaml"


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())


@pytest.fixture(scope="module")
def serve_config(manifest) -> dict[str, Any]:
    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # Ray Serve's own schema of a config file
    return config


def pods(manifest) -> list[dict[str, Any]]:
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def test_it_is_a_rayservice(manifest):
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"


def test_the_application_builds_from_its_import_path(serve_config):
    (app,) = serve_config["applications"]
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder)
    assert type(builder(app["args"])).__name__ == "Application"  # ScaleOut and Ray accept args


def test_every_pod_mounts_the_engine_folder(manifest, serve_config):
    engine_dir = serve_config["applications"][0]["args"]["engine_dir"]
    for pod in pods(manifest):
        (container,) = pod["containers"]
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        assert any(engine_dir.startswith(m.rstrip("/") + "/") for m in mounts), mounts
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert {m["name"] for m in container["volumeMounts"]} <= claims


def test_the_gpu_workers_hold_the_most_replicas(manifest, serve_config):
    args = serve_config["applications"][0]["args"]
    (workers,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    per_pod = int(limits["nvidia.com/gpu"]) // args["gpus_per_replica"]
    cpus = int(limits["cpu"]) // args["cpus_per_replica"]
    assert min(per_pod, cpus) * workers["maxReplicas"] >= args["max_replicas"]
    assert workers["minReplicas"] * min(per_pod, cpus) >= args["min_replicas"]
