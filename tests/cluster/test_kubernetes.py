"""deploy/kubernetes/ as an operator applies it: the ConfigMap's config is one relayd accepts in
a pod (with the Secret's files and the pod's environment), the probes reach the admin port's
/healthz and /readyz, and SIGTERM has time for the leases' release and shutdown_grace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from relayd.config import parse_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def manifests() -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"]] = document
    return found


def test_kustomization_lists_every_manifest() -> None:
    listed = set(manifests()["Kustomization"]["resources"])
    assert listed == {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}


def test_the_configmap_is_a_cluster_config_relayd_accepts_in_the_pod(tmp_path: Path) -> None:
    objects = manifests()
    deployment = objects["Deployment"]["spec"]["template"]["spec"]
    container = deployment["containers"][0]
    env_names = {entry["name"] for entry in container["env"]}
    assert {"HOSTNAME", "PGPASSWORD"} <= env_names
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secret_items = next(v for v in deployment["volumes"] if v["name"] == "secrets")["secret"]
    # The Secret's files, where the pod sees them, under a temporary root.
    root = tmp_path / "pod"
    for item in secret_items["items"]:
        path = root / mounts["secrets"].lstrip("/") / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(objects["Secret"]["stringData"][item["key"]])
    text = objects["ConfigMap"]["data"]["config.yaml"].replace(
        "/run/secrets", f"{root}/run/secrets"
    )
    config = parse_config(
        text,
        filename="config.yaml",
        env={"HOSTNAME": "relayd-5f7c9-x2x7q", "PGPASSWORD": "pw"},
        base_dir=tmp_path,
        check_files=True,
    )
    assert config.cluster is not None and config.store.url is not None
    assert config.cluster.replica == "relayd-5f7c9-x2x7q"
    assert config.admin.port == container["ports"][0]["containerPort"]
    assert config.admin.host == "0.0.0.0"
    # SIGTERM: watchers stop, leases go, deliveries get shutdown_grace; all before SIGKILL.
    assert deployment["terminationGracePeriodSeconds"] >= config.shutdown_grace + 15


def test_probes_use_healthz_for_liveness_and_readyz_for_readiness() -> None:
    container = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["ports"][0]["name"] == "admin"


def test_the_disruption_budget_covers_the_deployments_pods() -> None:
    objects = manifests()
    budget = objects["PodDisruptionBudget"]["spec"]
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["maxUnavailable"] == 1
    assert objects["Deployment"]["spec"]["replicas"] >= 2
