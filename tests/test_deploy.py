"""The deployment artifacts in ``deploy/``, validated offline (no image is pulled or built).

* the Dockerfile passes hadolint, and its exact command line and health check run the
  server outside a container;
* the compose file validates against the Compose specification's JSON schema
  (``tests/data/compose-spec.json``, vendored from the ``check-jsonschema`` wheel);
* the Kubernetes manifests build with kustomize (``kubectl kustomize`` where kubectl is
  installed, else the kustomization's resource list is checked file by file) and every
  object validates against the Kubernetes schemas shipped in ``kubernetes-validate``;
* the Prometheus rules and config pass ``promtool`` (Debian's ``prometheus`` package,
  installed when missing), and a structure check; the rules and the Grafana dashboard use
  only metrics the app exports.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import psutil
import pytest
import yaml

from core.metrics import series_names
from core.profile import load_profile
from core.supervisor import available_cpus
from tests.harness import free_port
from tests.system_packages import apt_install
from tests.test_architecture import LAYERS

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.37.0"
METRIC = re.compile(r"\bvoice_agent_[a-z0-9_]+\b")


# --- Dockerfile ---------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of deploy/Dockerfile, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form ``CMD`` / ``HEALTHCHECK ... CMD``."""
    assert args.startswith("["), f"not exec form: {args}"
    return json.loads(args)


def _image_env() -> dict[str, str]:
    """The ``ENV`` of the runtime stage."""
    env: dict[str, str] = {}
    stages = [i for i, (k, _) in enumerate(_dockerfile_instructions()) if k == "FROM"]
    for keyword, args in _dockerfile_instructions()[stages[-1] :]:
        if keyword == "ENV":
            for token in shlex.split(args):
                name, _, value = token.partition("=")
                env[name] = value
    return env


def _hadolint() -> str:
    found = Path(sys.executable).parent / "hadolint"
    return str(found) if found.exists() else shutil.which("hadolint") or "hadolint"


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_slim_non_root_and_complete() -> None:
    instructions = _dockerfile_instructions()
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage build"
    args = dict(
        a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a
    )  # ARG PYTHON_IMAGE=...
    assert "slim" in args["PYTHON_IMAGE"] and args["PYTHON_IMAGE"].startswith("python:3.11")
    users = [a for k, a in instructions if k == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    runs = " ".join(a for k, a in instructions if k == "RUN")
    assert "-r /tmp/requirements.lock" in runs and "--no-deps" in runs
    copied = " ".join(a for k, a in instructions if k == "COPY")
    for package in LAYERS:  # a new package cannot be forgotten in the image
        assert f"{package} ./{package}" in copied, package
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for package in LAYERS:
        assert f"!{package}/" in ignore, package
    assert any(k == "HEALTHCHECK" for k, _ in instructions)
    cmd = [a for k, a in instructions if k == "CMD"][-1]
    assert _exec_form(cmd) == ["python", "runner.py", "serve"]


def test_requirements_lock_has_every_pin_of_pyproject() -> None:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = {}
    for line in (DEPLOY / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            lock[canonicalize_name(name)] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        pinned = [s.version for s in req.specifier if s.operator == "=="]
        assert pinned, f"{spec} is not pinned"
        assert lock.get(canonicalize_name(req.name)) == pinned[0], (
            f"{req.name}: pyproject {pinned[0]}, lock {lock.get(canonicalize_name(req.name))}"
            " (run python deploy/lock.py)"
        )


def test_lock_keeps_a_dependency_only_another_python_needs() -> None:
    """``deploy/lock.py`` locks what the image's Python needs even when this one does not.

    ``redis`` needs ``async-timeout`` below Python 3.11.3 (a Debian base has 3.11.2): on a
    newer 3.11 it is not installed, and the script used to crash on it. A dependency that
    is not installed keeps its version from the current lock; with none to keep, the
    script says what to do.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("deploy_lock", DEPLOY / "lock.py")
    assert spec and spec.loader
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    absent = "no-such-dist-for-the-lock"
    kept = lock.closure([f"{absent}==1.0", "packaging"], previous={absent: "1.0"})
    assert kept[absent] == "1.0" and "packaging" in kept
    with pytest.raises(SystemExit, match=f"{absent} is needed by the image"):
        lock.closure([f"{absent}==1.0"], previous={})
    assert lock.locked_versions()["async-timeout"]  # locked for the Debian base's Python


def test_ci_runs_the_readmes_test_command_with_the_type_check() -> None:
    """``.ci/run`` runs exactly the README's test command; lint, format and types first."""
    readme = (REPO / "README.md").read_text()
    match = re.search(r"^# 2\. install and run the whole test suite\n(.+)$", readme, re.M)
    assert match, "README lost its test command"
    command = match.group(1)
    script = (REPO / ".ci" / "run").read_text().splitlines()
    runs = [line for line in script if line and not line.startswith(("#", "set ", "cd "))]
    assert runs == [command]
    steps = [step.strip() for step in command.split("&&")]
    pytest_step = next(
        i for i, step in enumerate(steps) if step.startswith(".venv/bin/python -m pytest")
    )
    assert steps.index(".venv/bin/basedpyright") < pytest_step
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["basedpyright"]
    assert config["failOnWarnings"] is True


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _data_dir_processes(data_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(data_dir) in cmdline:
            found.append(proc)
    return found


def test_the_images_command_and_healthcheck_run_the_server(tmp_path: Path) -> None:
    """CMD and HEALTHCHECK exactly as in the Dockerfile, with the image's ENV, a fresh
    DATA_DIR (embedded Postgres and Redis, started once by the parent for all workers)
    and a loopback port; SIGTERM drains and exits 0 leaving no server behind."""
    instructions = _dockerfile_instructions()
    cmd = _exec_form([a for k, a in instructions if k == "CMD"][-1])
    health = [a for k, a in instructions if k == "HEALTHCHECK"][-1]
    health_cmd = _exec_form(health[health.index("CMD ") + 4 :])
    assert cmd[0] == "python" and health_cmd[0] == "python"
    port = free_port()
    data_dir = tmp_path / "data"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")},
        **{k: v for k, v in _image_env().items() if k != "PATH"},
        "DATA_DIR": str(data_dir),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DRAIN_GRACE_SECS": "1",
        "PYTHONPATH": str(REPO),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)

    def healthcheck() -> int:
        return subprocess.run(
            [sys.executable, *health_cmd[1:]], cwd=REPO, env=env, capture_output=True, timeout=30
        ).returncode

    assert healthcheck() == 1  # nothing listens yet
    server = subprocess.Popen(
        [sys.executable, *cmd[1:]],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: server.poll() is not None or healthcheck() == 0, 240, "healthy")
        assert server.poll() is None, server.stderr.read() if server.stderr else ""
        ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=10)
        assert ready.status_code == 200, ready.text
        # One worker per core here, one embedded Postgres and one Redis for all of them.
        parent = psutil.Process(server.pid)
        children = parent.children(recursive=True)
        workers = [p for p in children if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == available_cpus()
        assert [p.name() for p in children].count("redis-server") == 1
        postmasters = [
            p for p in _data_dir_processes(data_dir) if p.name() in ("postgres", "postmaster")
        ]
        assert len(postmasters) == 1, postmasters
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=90) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        stderr = server.stderr.read() if server.stderr else ""
    assert healthcheck() == 1
    assert "drained: no live call left" in stderr
    assert not _data_dir_processes(data_dir), "an embedded server outlived the app"
    assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


# --- compose --------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_file_validates_against_the_compose_specification() -> None:
    schema = json.loads((REPO / "tests" / "data" / "compose-spec.json").read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(_compose()), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_compose_wires_the_services_for_one_host() -> None:
    services = _compose()["services"]
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"]["test"], name
        assert services[name]["volumes"], name
    migrate = services["migrate"]
    assert migrate["command"] == ["python", "-m", "crm.migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    app = services["app"]
    assert app["deploy"]["replicas"] == 2
    assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    grace = app["stop_grace_period"]
    assert grace.endswith("m") and int(grace[:-1]) * 60 > 600 + 10, "above the drain timeout"
    assert services["worker"]["command"] == ["python", "runner.py", "worker"]
    assert "8000" not in json.dumps(services["app"].get("ports", []))  # behind the proxy
    nginx = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert "http://app:8000" in nginx and "Upgrade" in nginx
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"]
    for volume in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("./"):
            assert (DEPLOY / source).exists(), source
    assert (DEPLOY / services["migrate"]["build"]["dockerfile"].removeprefix("deploy/")).exists()


# --- Prometheus and Grafana ------------------------------------------------------------


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_alert_rules_are_valid_and_cover_latency_tool_errors_and_readiness(
    tmp_path: Path,
) -> None:
    rules = _rules()
    for rule in rules:
        assert set(rule) >= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["for"]
        assert rule["annotations"]["summary"]
    by_name = {rule["alert"]: rule for rule in rules}
    v2v = by_name["VoiceToVoiceP95High"]
    assert "histogram_quantile(0.95" in v2v["expr"] and "> 1.5" in v2v["expr"]
    assert v2v["for"] == "5m"
    assert "voice_agent_tool_errors_total" in by_name["ToolErrorRateHigh"]["expr"]
    assert "voice_agent_ready_workers" in by_name["NoReadyInstance"]["expr"]
    used = {m for rule in rules for m in METRIC.findall(rule["expr"])}
    assert used <= series_names(), used - series_names()
    if not shutil.which("promtool"):  # Debian's prometheus package ships it
        log = apt_install(["prometheus"], installed=lambda: bool(shutil.which("promtool")))
        assert shutil.which("promtool"), "promtool could not be installed:\n" + "\n".join(log)
    promtool = str(shutil.which("promtool"))
    result = subprocess.run(
        [promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(
        config.replace("/etc/prometheus/alerts.yml", str(tmp_path / "alerts.yml"))
    )
    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # And promtool does fail a broken rule file (so the checks above can fail).
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n- name: x\n  rules:\n  - alert: A\n    expr: rate(\n")
    result = subprocess.run(
        [promtool, "check", "rules", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0


def test_grafana_dashboard_shows_the_apps_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "voice-agent.json").read_text())
    exprs = {
        panel["title"]: [t["expr"] for t in panel.get("targets", [])]
        for panel in dashboard["panels"]
    }
    used = {m for targets in exprs.values() for e in targets for m in METRIC.findall(e)}
    assert used <= series_names(), used - series_names()
    every = " ".join(e for targets in exprs.values() for e in targets)
    for needed in (
        "voice_agent_voice_to_voice_seconds_bucket",
        "voice_agent_stt_seconds_bucket",
        "voice_agent_llm_ttft_seconds_bucket",
        "voice_agent_tts_ttfb_seconds_bucket",
        "voice_agent_active_calls",
        "sum by (outcome) (increase(voice_agent_calls_total",
        "voice_agent_tool_errors_total",
    ):
        assert needed in every, needed
    assert "histogram_quantile(0.5," in every and "histogram_quantile(0.95," in every
    provisioning = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "voice-agent.yaml").read_text()
    )
    assert provisioning["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


# --- Kubernetes ---------------------------------------------------------------------


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _rendered_manifests() -> list[dict[str, Any]]:
    """``kubectl kustomize deploy/k8s`` when kubectl is there; else the listed resources
    plus the generated ConfigMaps, assembled here the way kustomize would."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        result = subprocess.run(
            [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        return [d for d in yaml.safe_load_all(result.stdout) if d]
    kustomization = _kustomization()
    docs = []
    for name in kustomization["resources"]:
        docs.extend(d for d in yaml.safe_load_all((K8S / name).read_text()) if d)
    for generator in kustomization["configMapGenerator"]:
        data = dict(item.split("=", 1) for item in generator.get("literals", []))
        data.update({f: (K8S / f).read_text() for f in generator.get("files", [])})
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"]},
                "data": data,
            }
        )
    return docs


def test_kubernetes_manifests_validate_against_the_schemas() -> None:
    kustomization = _kustomization()
    for name in kustomization["resources"]:
        assert (K8S / name).exists(), name
    docs = _rendered_manifests()
    extra = [d for d in yaml.safe_load_all((K8S / "hpa-active-calls.yaml").read_text()) if d]
    for doc in docs + extra:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Job",
            "PodDisruptionBudget",
            "Secret",
            "Service",
        ]
    )


def test_kubernetes_server_drains_and_is_probed_right() -> None:
    docs = _rendered_manifests()
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    config = next(
        d["data"]
        for d in by_kind["ConfigMap"]
        if d["metadata"]["name"].startswith("voice-agent-config")
    )
    server = next(d for d in by_kind["Deployment"] if d["metadata"]["name"] == "voice-agent")
    pod = server["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    drain = float(config["DRAIN_GRACE_SECS"]) + float(config["DRAIN_TIMEOUT_SECS"])
    assert pod["terminationGracePeriodSeconds"] > drain + 60
    assert "kill -TERM 1" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    requests = container["resources"]["requests"]
    assert float(requests["cpu"]) >= int(config["WORKERS"]), "a core per worker process"
    assert pod["securityContext"]["runAsNonRoot"] is True
    worker = next(d for d in by_kind["Deployment"] if d["metadata"]["name"] != "voice-agent")
    assert worker["spec"]["template"]["spec"]["containers"][0]["command"][-1] == "worker"
    assert worker["spec"]["replicas"] >= 2, "a standby dialer"
    hpa = by_kind["HorizontalPodAutoscaler"][0]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "voice-agent" and hpa["minReplicas"] >= 2
    pdb = by_kind["PodDisruptionBudget"][0]["spec"]
    labels = server["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    service = by_kind["Service"][0]["spec"]
    assert service["selector"].items() <= labels.items()
    job = by_kind["Job"][0]["spec"]["template"]["spec"]["containers"][0]
    assert job["command"] == ["python", "-m", "crm.migrate"]
    secret_keys = set(by_kind["Secret"][0]["stringData"])
    assert {"DATABASE_URL", "REDIS_URL", "OPENAI_API_KEY", "DEEPGRAM_API_KEY"} <= secret_keys


def test_kubernetes_profile_configmap_is_a_valid_profile(tmp_path: Path) -> None:
    profile = next(
        d
        for d in _rendered_manifests()
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("voice-agent-profile")
    )
    path = tmp_path / "dealership.toml"
    path.write_text(profile["data"]["dealership.toml"])
    assert load_profile(path).name


@pytest.mark.parametrize(
    "path",
    ["compose.yaml", "prometheus/alerts.yml", "prometheus/prometheus.yml", "k8s/secret.yaml"],
)
def test_no_real_secret_is_committed(path: str) -> None:
    text = (DEPLOY / path).read_text()
    assert not re.search(r"sk-[A-Za-z0-9]{20,}|AC[0-9a-f]{32}", text)
