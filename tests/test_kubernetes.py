"""Kubernetes manifests: schema-valid (offline schemas from kubernetes-validate) and wired as documented."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
CORE = ["deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"]


def _validate(*files: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "kubernetes-validate"
    cmd = str(exe) if exe.exists() else shutil.which("kubernetes-validate")
    if not cmd:
        pytest.fail("kubernetes-validate is not installed (pip install -e '.[dev]')")
    return subprocess.run([cmd, "--strict", *map(str, files)], capture_output=True, text=True, timeout=120)


def test_manifests_match_the_kubernetes_schemas() -> None:
    out = _validate(*(K8S / f for f in CORE))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("passed") + out.stderr.count("passed") == len(CORE)


def test_the_validator_rejects_a_broken_manifest(tmp_path: Path) -> None:
    doc = yaml.safe_load((K8S / "deployment.yaml").read_text())
    doc["spec"]["replicas"] = "two"
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/x"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert _validate(bad).returncode != 0


def test_deployment_wiring() -> None:
    d = yaml.safe_load((K8S / "deployment.yaml").read_text())
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["terminationGracePeriodSeconds"] > float(env["CLASSIFIER_SHUTDOWN_GRACE_S"]) >= float(env["CLASSIFIER_DRAIN_DELAY_S"])
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]  # a writable /tmp on a read-only root
    # shared memory for the owner topology's row slabs, in memory and bounded
    assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"]


def test_kserve_inference_service_uses_the_v2_protocol() -> None:
    isvc = yaml.safe_load((K8S / "inferenceservice.yaml").read_text())
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    c = isvc["spec"]["predictor"]["containers"][0]
    assert c["name"] == "kserve-container" and c["ports"][0]["containerPort"] == 8000
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
