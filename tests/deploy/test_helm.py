"""The Helm chart, rendered by Helm's own engine and every object validated against the Kubernetes schemas."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.settings import Settings
from router.policy import parse_policy
from tests.deploy.conftest import (
    CHART,
    DEPLOY,
    Rendered,
    cli_command,
    production_values,
    promtool,
    render_chart,
    used_options,
    vllm_flags,
)

# The oldest Kubernetes the chart claims (Chart.yaml kubeVersion) and the newest schemas bundled.
KUBE_VERSIONS = ("1.25.0", "1.37.0")
# Prometheus operator kinds: their schemas are CRDs, not Kubernetes', and are checked below instead.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
FULLNAME = "dg-distillgate"
ADAPTERS = "/var/lib/distillgate/adapters"


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    if obj["kind"] == "Pod":
        return spec
    return spec["template"]["spec"]


def container(obj: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = pod_spec(obj)["containers"]
    return next(c for c in containers if name is None or c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def mount_path(obj: dict[str, Any], c: dict[str, Any], claim: str) -> str:
    volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
    for m in c["volumeMounts"]:
        pvc = volumes[m["name"]].get("persistentVolumeClaim")
        if pvc and pvc["claimName"] == claim:
            return str(m["mountPath"])
    raise AssertionError(f"{obj['metadata']['name']} does not mount {claim}")


@pytest.mark.parametrize("which", ["default", "production"])
def test_every_object_is_valid_against_the_kubernetes_schemas(
    which: str, default_render: Rendered, production_render: Rendered
) -> None:
    rendered = default_render if which == "default" else production_render
    checked = 0
    for obj in rendered.objects:
        if obj["kind"] in OPERATOR_KINDS:
            continue
        for version in KUBE_VERSIONS:
            # strict: unknown fields (a typo'd key) fail too.
            kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 15


def test_default_render_has_the_whole_stack(default_render: Rendered) -> None:
    names = {(o["kind"], o["metadata"]["name"]) for o in default_render.objects}
    assert {
        ("Deployment", f"{FULLNAME}-gateway"),
        ("Service", FULLNAME),
        ("PodDisruptionBudget", f"{FULLNAME}-gateway"),
        ("ConfigMap", f"{FULLNAME}-config"),
        ("ConfigMap", f"{FULLNAME}-policy"),
        ("Deployment", f"{FULLNAME}-worker"),
        ("Deployment", f"{FULLNAME}-vllm"),
        ("Service", f"{FULLNAME}-vllm"),
        ("PersistentVolumeClaim", f"{FULLNAME}-adapters"),
        ("StatefulSet", f"{FULLNAME}-postgresql"),
        ("Job", f"{FULLNAME}-migrate"),
        ("Pod", f"{FULLNAME}-test-readyz"),
    } <= names
    # No Prometheus operator in the cluster: no operator objects; no autoscaling by default.
    assert not default_render.kinds() & (OPERATOR_KINDS | {"HorizontalPodAutoscaler", "CronJob"})


def test_production_render_has_hpa_cronjobs_and_operator_objects(production_render: Rendered) -> None:
    assert "StatefulSet" not in production_render.kinds()  # external PostgreSQL
    hpa = production_render.get("HorizontalPodAutoscaler", f"{FULLNAME}-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{FULLNAME}-gateway",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 30)
    # The HPA owns the replica count.
    assert "replicas" not in production_render.get("Deployment", f"{FULLNAME}-gateway")["spec"]
    cronjobs = {c["metadata"]["name"]: c for c in production_render.all("CronJob")}
    assert set(cronjobs) == {
        f"{FULLNAME}-train-classify-email",
        f"{FULLNAME}-train-extract-ade",
        f"{FULLNAME}-prune",
    }
    assert cronjobs[f"{FULLNAME}-train-extract-ade"]["spec"]["suspend"] is True
    assert production_render.kinds() >= OPERATOR_KINDS | {"Ingress"}


def test_secrets_are_only_referenced(default_render: Rendered, production_render: Rendered) -> None:
    # The only Secret the chart ever writes is the generated password of its own PostgreSQL.
    assert [s["metadata"]["name"] for s in default_render.all("Secret")] == [f"{FULLNAME}-postgresql"]
    assert production_render.all("Secret") == []
    gateway = container(production_render.get("Deployment", f"{FULLNAME}-gateway"))
    env = env_of(gateway)
    assert env["TEACHER_API_KEY"] == {"secretKeyRef": {"name": "distillgate-prod", "key": "teacher-api-key"}}
    assert env["DISTILLGATE_AUTH__ADMIN_KEY"] == {
        "secretKeyRef": {"name": "distillgate-prod", "key": "admin-key"}
    }
    assert env["STUDENT_API_KEY"] == {"secretKeyRef": {"name": "distillgate-prod", "key": "student-api-key"}}
    assert env["DISTILLGATE_DATABASE_URL"] == {
        "secretKeyRef": {"name": "distillgate-prod-database", "key": "url"}
    }
    # In-chart PostgreSQL: the URL has no password in it; libpq reads PGPASSWORD from the Secret.
    default_env = env_of(container(default_render.get("Deployment", f"{FULLNAME}-gateway")))
    assert default_env["DISTILLGATE_DATABASE_URL"] == (
        f"postgresql+psycopg://distillgate@{FULLNAME}-postgresql:5432/distillgate"
    )
    assert default_env["PGPASSWORD"] == {
        "secretKeyRef": {"name": f"{FULLNAME}-postgresql", "key": "password"}
    }


def test_external_database_needs_its_secret() -> None:
    import helm_python

    with pytest.raises(helm_python.HelmError, match=r"database\.existingSecret"):
        render_chart({"postgresql": {"enabled": False}})


def test_rendered_config_is_valid_gateway_settings(production_render: Rendered, tmp_path: Path) -> None:
    from gateway.settings import load_settings

    text = production_render.get("ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"]
    (tmp_path / "config.yaml").write_text(text)
    settings: Settings = load_settings(tmp_path / "config.yaml")
    assert (settings.host, settings.port, settings.workers) == ("0.0.0.0", 8000, 2)
    assert settings.ops_port == 8001  # the container port the probes and the ServiceMonitor use
    assert str(settings.policy_file) == "/etc/distillgate/policy/policy.yaml"
    assert str(settings.adapters_dir) == ADAPTERS
    assert str(settings.recorder.spool_dir) == "/var/lib/distillgate/spool"
    # The migration Job applies the schema, so replicas never race on it; the worker schedules training.
    assert settings.migrate_on_start is False and settings.run_scheduler is False
    assert settings.shutdown_grace_s == 25


def test_rendered_policy_is_valid_and_points_at_the_vllm_service(production_render: Rendered) -> None:
    text = production_render.get("ConfigMap", f"{FULLNAME}-policy")["data"]["policy.yaml"]
    policy = parse_policy(yaml.safe_load(text))
    service = production_render.get("Service", f"{FULLNAME}-vllm")
    assert policy.student is not None
    assert (
        policy.student.base_url
        == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/v1"
    )
    vllm = container(production_render.get("Deployment", f"{FULLNAME}-vllm"))
    assert policy.student.base_model == vllm["args"][0] == "Qwen/Qwen2.5-7B-Instruct"
    assert policy.teacher.api_key_env == "TEACHER_API_KEY"
    assert policy.for_task("extract-ade").promote.scorer == "json_fields"


def test_gateway_pods_are_locked_down_and_probed(production_render: Rendered) -> None:
    deployment = production_render.get("Deployment", f"{FULLNAME}-gateway")
    spec = pod_spec(deployment)
    gw = container(deployment)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001  # the image's user (deploy/Dockerfile)
    assert gw["securityContext"]["readOnlyRootFilesystem"] is True
    assert gw["securityContext"]["allowPrivilegeEscalation"] is False
    assert gw["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"] for m in gw["volumeMounts"]}
    assert {"/tmp", "/var/lib/distillgate/spool", "/etc/distillgate/policy"} <= mounts
    assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Probes use the ops listener, never the API port a connection flood can fill.
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    assert ports == {"http": 8000, "ops": 8001}
    assert {
        gw[probe]["httpGet"]["port"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    } == {"ops"}
    assert gw["args"] == ["serve", "--config", "/etc/distillgate/config.yaml"]
    assert gw["resources"]["requests"]["cpu"] == "2"


def test_termination_grace_covers_prestop_drain_and_flush(production_render: Rendered) -> None:
    deployment = production_render.get("Deployment", f"{FULLNAME}-gateway")
    gw = container(deployment)
    sleep = int(gw["lifecycle"]["preStop"]["exec"]["command"][1])
    config = yaml.safe_load(production_render.get("ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert sleep == 5
    assert grace == sleep + config["shutdown_grace_s"] + 5 == 35


def test_config_change_rolls_pods_and_policy_change_hot_reloads() -> None:
    def annotations(values: dict[str, Any]) -> dict[str, str]:
        rendered = Rendered(render_chart(values))
        meta = rendered.get("Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["metadata"]
        return dict(meta["annotations"])

    base = annotations({})
    assert annotations({"config": {"log_level": "DEBUG"}})["checksum/config"] != base["checksum/config"]
    # A policy edit reaches running pods through the mounted ConfigMap; no restart by default.
    assert annotations({"policy": {"tasks": {"t": {"distill": False}}}}) == base
    rolled = annotations({"policyReload": {"rollPods": True}, "policy": {"tasks": {"t": {"distill": False}}}})
    assert "checksum/policy" in rolled


def test_policy_configmap_is_mounted_as_a_directory_so_it_updates_in_place(
    production_render: Rendered,
) -> None:
    gw = container(production_render.get("Deployment", f"{FULLNAME}-gateway"))
    policy_mount = next(m for m in gw["volumeMounts"] if m["name"] == "policy")
    assert "subPath" not in policy_mount  # subPath mounts never see ConfigMap updates


def test_adapters_volume_is_shared_at_one_path(production_render: Rendered) -> None:
    claim = f"{FULLNAME}-adapters"
    pvc = production_render.get("PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    holders = [
        production_render.get("Deployment", f"{FULLNAME}-worker"),
        production_render.get("Deployment", f"{FULLNAME}-vllm"),
        *(c for c in production_render.all("CronJob") if c["metadata"]["name"] != f"{FULLNAME}-prune"),
    ]
    paths = {mount_path(obj, container(obj), claim) for obj in holders}
    assert paths == {ADAPTERS}
    vllm = production_render.get("Deployment", f"{FULLNAME}-vllm")
    vllm_mount = next(m for m in container(vllm)["volumeMounts"] if m["mountPath"] == ADAPTERS)
    assert vllm_mount["readOnly"] is True


def test_vllm_runs_with_runtime_lora_loading(production_render: Rendered) -> None:
    vllm = container(production_render.get("Deployment", f"{FULLNAME}-vllm"))
    args = vllm["args"]
    assert "--enable-lora" in args
    assert {"--max-loras=16", "--max-lora-rank=32", "--max-cpu-loras=64", "--max-logprobs=20"} <= set(args)
    env = env_of(vllm)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # Several replicas: each resolves an adapter it was never told about from the shared volume.
    assert env["VLLM_PLUGINS"] == "lora_filesystem_resolver"
    assert env["VLLM_LORA_RESOLVER_CACHE_DIR"] == ADAPTERS
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "distillgate-prod", "key": "hf-token"}}
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert vllm["startupProbe"]["httpGet"]["path"] == "/health"
    spec = pod_spec(production_render.get("Deployment", f"{FULLNAME}-vllm"))
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_vllm_rank_below_the_policy_rank_is_refused() -> None:
    import helm_python

    with pytest.raises(
        helm_python.HelmError,
        match=r"vllm\.maxLoraRank \(8\) is below policy\.defaults\.train\.lora_rank \(16\)",
    ):
        render_chart({"vllm": {"maxLoraRank": 8}})  # policy trains rank 16
    with pytest.raises(helm_python.HelmError, match="maxCpuLoras"):
        render_chart({"vllm": {"maxLoras": 8, "maxCpuLoras": 4}})


def test_training_jobs_run_on_gpu_nodes(production_render: Rendered) -> None:
    job = production_render.get("CronJob", f"{FULLNAME}-train-classify-email")
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    train = container(job)
    assert train["args"] == [
        "train",
        "--task",
        "classify-email",
        "--config",
        "/etc/distillgate/config.yaml",
        "--gpus",
        "1",
    ]
    assert train["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
    }.items() <= (env_of(train).items())
    spec = pod_spec(job)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["restartPolicy"] == "Never"
    worker = production_render.get("Deployment", f"{FULLNAME}-worker")
    assert container(worker)["args"] == ["worker", "--config", "/etc/distillgate/config.yaml"]
    assert container(worker)["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_a_multi_gpu_training_job_asks_for_its_gpus_and_launches_as_many_ranks() -> None:
    values = production_values()
    values["trainer"]["cronJobs"][0]["gpus"] = 4
    rendered = Rendered(render_chart(values, api_versions=("monitoring.coreos.com/v1",)))
    job = rendered.get("CronJob", f"{FULLNAME}-train-classify-email")
    train = container(job)
    assert train["args"][-2:] == ["--gpus", "4"]
    assert train["resources"]["limits"]["nvidia.com/gpu"] == 4
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)
    other = container(rendered.get("CronJob", f"{FULLNAME}-train-extract-ade"))
    assert other["args"][-2:] == ["--gpus", "1"] and other["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The command is the CLI's own: --gpus is an option of `distillgate train`.
    path, options = cli_command(train["args"])
    assert path == "train" and used_options(train["args"]) <= options


def test_migrations_run_as_a_hook_job(default_render: Rendered) -> None:
    job = default_render.get("Job", f"{FULLNAME}-migrate")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,pre-upgrade"
    assert container(job)["args"] == ["db", "upgrade"]
    assert "DISTILLGATE_DATABASE_URL" in env_of(container(job))


def test_pdb_and_services_select_the_gateway_pods(production_render: Rendered) -> None:
    pod_labels = production_render.get("Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["metadata"][
        "labels"
    ]
    pdb = production_render.get("PodDisruptionBudget", f"{FULLNAME}-gateway")
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = production_render.get("Service", FULLNAME)
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ingress = production_render.get("Ingress", FULLNAME)
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": FULLNAME, "port": {"name": "http"}}


def test_service_monitors_scrape_named_ports_under_the_alerts_job_names(production_render: Rendered) -> None:
    jobs = {}
    for monitor in production_render.all("ServiceMonitor"):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        selector = monitor["spec"]["selector"]
        matches = [
            s
            for s in production_render.all("Service")
            if selector["matchLabels"].items() <= s["metadata"]["labels"].items()
            and not any(e["key"] in s["metadata"]["labels"] for e in selector.get("matchExpressions", []))
        ]
        assert len(matches) == 1, [s["metadata"]["name"] for s in matches]
        endpoint = monitor["spec"]["endpoints"][0]
        assert endpoint["port"] in {p["name"] for p in matches[0]["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
        jobs[matches[0]["metadata"]["name"]] = endpoint["relabelings"][0]["replacement"]
    # The same job names as deploy/prometheus/prometheus.yml, which alerts.yml matches on.
    assert jobs == {FULLNAME: "distillgate-gateway", f"{FULLNAME}-vllm": "distillgate-student"}


def test_prometheus_rule_carries_the_alert_rules_and_promtool_accepts_them(
    production_render: Rendered, tmp_path: Path
) -> None:
    rule = production_render.get("PrometheusRule", FULLNAME)
    assert (
        rule["spec"]["groups"] == yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    )
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run([promtool(), "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_dashboard_configmap_is_the_dashboard(production_render: Rendered) -> None:
    import json

    cm = production_render.get("ConfigMap", f"{FULLNAME}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(cm["data"]["distillgate.json"])
    assert shipped == json.loads((DEPLOY / "grafana" / "distillgate.json").read_text())


def test_notes_tell_how_to_point_an_app_at_the_gateway(
    default_render: Rendered, production_render: Rendered
) -> None:
    notes = default_render.notes()
    assert f'base_url = "http://{FULLNAME}.llm.svc.cluster.local:8000/v1"' in notes
    assert "kubectl -n llm port-forward svc/dg-distillgate 8000:8000" in notes
    assert "create secret generic distillgate-secrets" in notes
    command = next(
        line.split("distillgate ", 1)[1].split() for line in notes.splitlines() if "distillgate keys" in line
    )
    assert cli_command(command) == ("keys create", cli_command(command)[1])
    assert used_options(command) <= cli_command(command)[1]
    prod = production_render.notes()
    assert 'base_url = "https://llm.example.com/v1"' in prod
    assert f"create job --from=cronjob/{FULLNAME}-train-classify-email" in prod


# Blocks that are Kubernetes or policy structures, documented as a whole by the comment above them.
PASSTHROUGH_BLOCKS = {
    "podSecurityContext",
    "securityContext",
    "resources",
    "nodeSelector",
    "tolerations",
    "labels",
    "prices",
    "defaults",
    "tasks",
    "requests",
    "limits",
}


def test_values_are_documented_field_by_field() -> None:
    """Every leaf of values.yaml has a comment right above it or on its line (the chart's reference)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")):
            continue
        key, _, value = stripped.partition(":")
        if not value.strip():  # a block: its leaves carry the docs
            continue
        previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        if previous.startswith("#") or " #" in value or PASSTHROUGH_BLOCKS & set(_ancestors(lines, i)):
            continue
        undocumented.append(f"line {i + 1}: {key}")
    assert undocumented == []


def _ancestors(lines: list[str], i: int) -> list[str]:
    """Keys of the blocks that contain line ``i``, innermost first."""
    out = []
    indent = len(lines[i]) - len(lines[i].lstrip())
    for j in range(i - 1, -1, -1):
        line = lines[j]
        own = len(line) - len(line.lstrip())
        if line.strip() and not line.strip().startswith(("#", "-")) and own < indent:
            out.append(line.strip().partition(":")[0])
            indent = own
    return out


def test_lint_reports_no_errors() -> None:
    import helm_python

    helm_python.disable_logging()
    for values in (None, production_values()):
        report = helm_python.lint(CHART, copy.deepcopy(values), strict=False)
        assert report["errors"] == []
        assert [m for m in report["messages"] if m["severity"] >= 3] == []


@pytest.mark.parametrize(
    ("kind", "name", "command"),
    [
        ("Deployment", f"{FULLNAME}-gateway", "serve"),
        ("Deployment", f"{FULLNAME}-worker", "worker"),
        ("CronJob", f"{FULLNAME}-train-classify-email", "train"),
        ("CronJob", f"{FULLNAME}-prune", "db prune"),
        ("Job", f"{FULLNAME}-migrate", "db upgrade"),
    ],
)
def test_chart_runs_commands_the_cli_has(
    production_render: Rendered, kind: str, name: str, command: str
) -> None:
    rendered = production_render if kind != "Job" else Rendered(render_chart())
    args = container(rendered.get(kind, name))["args"]
    path, options = cli_command(args)
    assert path == command
    assert used_options(args) <= options, used_options(args) - options


def test_vllm_flags_match_the_reference_launch_script(default_render: Rendered, tmp_path: Path) -> None:
    """The chart passes vLLM what deploy/vllm/serve.sh passes (with deploy/vllm/vllm.env's defaults)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vllm").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (bin_dir / "vllm").chmod(0o755)
    script = subprocess.run(
        ["bash", str(DEPLOY / "vllm" / "serve.sh")],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    chart = container(default_render.get("Deployment", f"{FULLNAME}-vllm"))["args"]
    reference = vllm_flags(script)
    rendered = vllm_flags(chart)
    assert chart[0] == script[1]  # the base model
    for flag in ("host", "port"):
        reference.pop(flag)
    assert {k: rendered.get(k) for k in reference} == reference
