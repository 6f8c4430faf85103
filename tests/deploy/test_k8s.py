"""deploy/k8s: schema-valid for the Kubernetes API, and what the deployment promises.

Schema validation uses kubernetes-validate (the OpenAPI JSON schemas of each Kubernetes
release ship inside the wheel, so it runs offline), in strict mode: unknown fields fail.
Install it with `pip install -e ".[deploy-test]"`; without it those checks are skipped.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
K8S_VERSION = "1.30.0"  # the oldest release still commonly run; the manifests use nothing newer
MANIFESTS = ("deployment.yaml", "service.yaml", "pvc.yaml", "secret.yaml")


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


@pytest.fixture(scope="module")
def validate():
    kv = pytest.importorskip("kubernetes_validate.utils", reason='needs kubernetes-validate (pip install -e ".[deploy-test]")')
    return lambda data: kv.validate(data, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_matches_the_kubernetes_schema(validate, name: str) -> None:
    validate(load(name))


def test_schema_check_rejects_a_misspelt_field(validate) -> None:
    import kubernetes_validate.utils as kv

    bad = copy.deepcopy(load("deployment.yaml"))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/health", "port": 8000}}
    with pytest.raises(kv.ValidationError):
        validate(bad)


def test_kustomization_lists_every_manifest() -> None:
    assert sorted(load("kustomization.yaml")["resources"]) == sorted(MANIFESTS)


def _pod() -> dict:
    return load("deployment.yaml")["spec"]["template"]["spec"]


def _container() -> dict:
    (container,) = _pod()["containers"]
    return container


def test_deployment_runs_two_non_root_replicas_read_only() -> None:
    assert load("deployment.yaml")["spec"]["replicas"] == 2
    assert _pod()["securityContext"]["runAsNonRoot"] is True
    security = _container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in _container()["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod()["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_probes_hit_health_and_resources_are_bounded() -> None:
    container = _container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert set(container["resources"]) == {"requests", "limits"}


def test_adapters_are_one_shared_volume() -> None:
    assert load("pvc.yaml")["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in _pod()["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in _container()["volumeMounts"]}
    assert volumes[mounts["/data/adapters"]]["persistentVolumeClaim"]["claimName"] == load("pvc.yaml")["metadata"]["name"]
    args = _container()["args"]
    assert args[args.index("--adapter-dir") + 1] == "/data/adapters"


def test_api_keys_come_from_the_secret() -> None:
    secret = load("secret.yaml")
    env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in _container()["env"]}
    for var in ("LORA_SERVE_API_KEY", "LORA_SERVE_ADMIN_API_KEY"):
        ref = env[var]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert all(v.startswith("REPLACE-ME") for v in secret["stringData"].values())  # no real key in the repo


def test_service_targets_the_pods() -> None:
    service = load("service.yaml")
    labels = load("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == _container()["ports"][0]["name"]
