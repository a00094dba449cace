"""The container wiring that matters, checked without a Docker engine.

Covers docker/Dockerfile, docker/entrypoint.sh, compose.yaml and its config
files, .dockerignore, the KubeRay manifest and `imagen.container.build_app`.
Nothing here starts Ray, a database or a container.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
import yaml

from imagen.errors import SettingsError
from imagen.settings import _ENV_FIELDS, Settings
from serve_app.options import ServeOptions
from tests.lint_container import (
    COMPOSE_FILE,
    ENTRYPOINT,
    MULTI_HOST_COMPOSE_FILE,
    RAY_WORKER_COMPOSE_FILE,
    ROOT,
    arg_defaults,
    interpolate,
    load_compose,
    parse_dockerfile,
    run_hadolint,
    run_shellcheck,
    validate_compose_schema,
    validate_interpolated_compose,
)

KUBERAY_MANIFEST = ROOT / "docker" / "kuberay" / "rayservice.yaml"
LOCAL_DB_ENV = ROOT / "docker" / "local-db.env"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "docker" / "grafana" / "provisioning"
GO_WORKER_ENV_FILE = ".dotfiles/.env.imagen-worker"

# IMAGEN_* names read by the container itself rather than by Settings.
CONTAINER_ONLY_VARIABLES = {"IMAGEN_MIGRATE_ON_START"}


def known_imagen_variables() -> set[str]:
    settings_names = {env_name for env_name, _parse in _ENV_FIELDS.values()}
    option_names = {f"IMAGEN_{name.upper()}" for name in ServeOptions.__dataclass_fields__}
    return settings_names | option_names | CONTAINER_ONLY_VARIABLES


def final_stage():
    _globals, stages = parse_dockerfile()
    return stages[-1]


def image_environment() -> dict[str, str]:
    """The ENV of the final stage as KEY -> VALUE."""
    environment = {}
    for instruction in final_stage().all("ENV"):
        for word in shlex.split(instruction.arguments):
            name, _, value = word.partition("=")
            environment[name] = value
    return environment


def duration_s(text: str) -> float:
    """Parse a compose duration such as `90s`, `1m30s` or `2m`."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"not a compose duration: {text!r}")
    return sum(float(number) * units[unit] for number, unit in parts)


def published_ports(service: dict) -> list[dict]:
    """Every published port of a service in long syntax (short syntax is converted)."""
    ports = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.append(entry)
            continue
        text = str(entry).rsplit("/", 1)[0]
        parts = text.split(":")
        if len(parts) == 3:
            ports.append({"host_ip": parts[0], "published": parts[1], "target": parts[2]})
        elif len(parts) == 2:
            ports.append({"host_ip": None, "published": parts[0], "target": parts[1]})
        else:
            ports.append({"host_ip": None, "published": None, "target": parts[0]})
    return ports


def env_file_paths(service: dict) -> list[str]:
    entries = service.get("env_file", [])
    entries = [entries] if isinstance(entries, str) else entries
    return [entry["path"] if isinstance(entry, dict) else entry for entry in entries]


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose({"HOME": "/home/operator"})


@pytest.fixture(scope="module")
def kuberay_documents() -> list[dict]:
    return [document for document in yaml.safe_load_all(KUBERAY_MANIFEST.read_text()) if document]


# ------------------------------------------------------------------ lint


def test_hadolint_passes():
    result = run_hadolint()
    assert result.passed, result.output


def test_shellcheck_passes_where_installed():
    result = run_shellcheck()
    if result.skipped:
        pytest.skip(result.output)
    assert result.passed, result.output


def test_compose_file_matches_schema():
    result = validate_compose_schema(COMPOSE_FILE)
    assert result.passed, result.output


def test_interpolated_compose_matches_schema():
    result = validate_interpolated_compose({"HOME": "/home/operator", "IMAGEN_GPUS": "2"})
    assert result.passed, result.output


def test_multi_host_compose_files_match_schema():
    environ = {"HOME": "/home/operator", "RAY_HEAD_ADDRESS": "127.0.0.1:6379"}
    for path in (MULTI_HOST_COMPOSE_FILE, RAY_WORKER_COMPOSE_FILE):
        result = validate_interpolated_compose(environ, path)
        assert result.passed, result.output


def test_interpolation_follows_compose_rules():
    environ = {"HOME": "/home/operator", "EMPTY": ""}
    assert interpolate("${UNSET:-${HOME}/x}", environ) == "/home/operator/x"
    assert interpolate("${EMPTY:-d}", environ) == "d"
    assert interpolate("${EMPTY-d}", environ) == ""
    assert interpolate("${HOME:+set}", environ) == "set"
    assert interpolate("$$HOME", environ) == "$HOME"
    with pytest.raises(ValueError, match="UNSET"):
        interpolate("${UNSET:?give it}", environ)


# ------------------------------------------------------------------ Dockerfile


def test_final_stage_has_no_build_tools():
    _globals, stages = parse_dockerfile()
    assert len(stages) >= 2
    final = stages[-1]
    installed = " ".join(instruction.arguments for instruction in final.all("RUN"))
    for tool in ("build-essential", "gcc", "g++", "python3-dev", "make "):
        assert tool not in installed, f"final stage installs {tool}"
    copies_from_builder = [item for item in final.all("COPY") if "--from=" in item.arguments]
    assert copies_from_builder, "final stage copies nothing from the build stage"


def test_final_stage_user_is_not_root():
    users = final_stage().all("USER")
    assert users, "final stage has no USER instruction, so it runs as root"
    user = users[-1].arguments.split(":")[0]
    assert user not in ("root", "0")
    assert user.isdigit(), "use a numeric uid so Kubernetes' runAsNonRoot can verify it"


def test_healthcheck_runs_imagen_health():
    checks = final_stage().all("HEALTHCHECK")
    assert len(checks) == 1
    command = checks[0].arguments.split("CMD", 1)[1].strip()
    assert yaml.safe_load(command) == ["imagen", "health"]


def test_entrypoint_exec_form_with_tini():
    entrypoints = final_stage().all("ENTRYPOINT")
    assert len(entrypoints) == 1
    words = yaml.safe_load(entrypoints[0].arguments)
    assert isinstance(words, list), "ENTRYPOINT must use the exec form so no shell sits before tini"
    assert words[0].endswith("/tini")
    assert "-g" not in words, "tini -g would send SIGTERM to Ray's processes before imagen stops them"
    assert words[-1] == "/usr/local/bin/imagen-entrypoint"
    assert yaml.safe_load(final_stage().all("CMD")[-1].arguments) == ["imagen", "up"]
    assert final_stage().all("STOPSIGNAL")[-1].arguments == "SIGTERM"


def test_image_pins_match_ray_and_torch():
    import ray

    global_args, stages = parse_dockerfile()
    builder_args = arg_defaults(stages[0].instructions)
    makefile = (ROOT / "Makefile").read_text()
    torch_in_makefile = re.search(r"^TORCH_VERSION \?= (\S+)$", makefile, re.MULTILINE).group(1)
    assert builder_args["RAY_VERSION"] == ray.__version__
    assert builder_args["TORCH_VERSION"] == torch_in_makefile
    assert arg_defaults(global_args)["CUDA_BASE_IMAGE"].startswith("nvidia/cuda:")


def test_image_grants_driver_utility_capability():
    capabilities = image_environment()["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    # `utility` mounts libnvidia-ml, which the Ray dashboard's GPU panel loads.
    assert "utility" in capabilities
    assert "compute" in capabilities


def test_dockerignore_admits_build_sources():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*", "start from an empty context and admit paths one by one"
    admitted = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    _globals, stages = parse_dockerfile()
    for stage in stages:
        for instruction in stage.all("COPY"):
            if "--from=" in instruction.arguments:
                continue
            words = [word for word in instruction.arguments.split() if not word.startswith("--")]
            for source in words[:-1]:
                assert source.rstrip("/") in admitted, f"{source} is copied but excluded by .dockerignore"
    for excluded in (".venv", ".data", ".git", "tests"):
        assert excluded not in admitted


def test_entrypoint_script_is_executable():
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR


def test_requirements_helper_lists_extras():
    script = ROOT / "docker" / "pyproject_requirements.py"
    listed = subprocess.run([sys.executable, str(script), str(ROOT / "pyproject.toml"), "gpu"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert any(line.startswith("torch") for line in listed)
    assert any(line.startswith("ray[serve]") for line in listed)
    assert any(line.startswith("torchao") for line in listed)

    unknown = subprocess.run([sys.executable, str(script), str(ROOT / "pyproject.toml"), "nonexistent"],
                             capture_output=True, text=True, check=False)
    assert unknown.returncode != 0
    assert "nonexistent" in unknown.stderr


# ------------------------------------------------------------------ entrypoint.sh


@pytest.fixture
def stub_imagen(tmp_path):
    """A fake `imagen` on PATH that records its arguments and process id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    stub = bin_dir / "imagen"
    stub.write_text(f'#!/bin/sh\necho "$$ $*" >> {shlex.quote(str(log))}\n')
    stub.chmod(0o755)
    return bin_dir, log


def run_entrypoint(stub_imagen, args: list[str], **env: str) -> tuple[subprocess.CompletedProcess, list[str], int]:
    bin_dir, log = stub_imagen
    environ = {"PATH": f"{bin_dir}:/usr/bin:/bin", **env}
    process = subprocess.Popen(["sh", str(ENTRYPOINT), *args], env=environ,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=30)
    completed = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    calls = log.read_text().splitlines() if log.exists() else []
    return completed, calls, process.pid


def test_entrypoint_rejects_missing_database_url(stub_imagen):
    completed, calls, _pid = run_entrypoint(stub_imagen, [])
    assert completed.returncode == 64
    assert "IMAGEN_WORKER_DATABASE_URL" in completed.stderr
    assert calls == []


def test_entrypoint_migrates_then_execs_up(stub_imagen):
    completed, calls, pid = run_entrypoint(stub_imagen, [], IMAGEN_WORKER_DATABASE_URL="postgresql://db/imagen",
                                           IMAGEN_MIGRATE_ON_START="1")
    assert completed.returncode == 0, completed.stderr
    assert [call.split(" ", 1)[1] for call in calls] == ["migrate", "up"]
    # exec: `imagen up` replaced the shell, so it has the shell's process id.
    assert calls[-1].split(" ", 1)[0] == str(pid)


def test_entrypoint_skips_migrations_by_default(stub_imagen):
    completed, calls, _pid = run_entrypoint(stub_imagen, ["imagen", "up"],
                                            IMAGEN_WORKER_DATABASE_URL="postgresql://db/imagen")
    assert completed.returncode == 0, completed.stderr
    assert [call.split(" ", 1)[1] for call in calls] == ["up"]


def test_entrypoint_rejects_invalid_migrate_flag(stub_imagen):
    completed, calls, _pid = run_entrypoint(stub_imagen, [], IMAGEN_WORKER_DATABASE_URL="postgresql://db/imagen",
                                            IMAGEN_MIGRATE_ON_START="sometimes")
    assert completed.returncode == 64
    assert "IMAGEN_MIGRATE_ON_START" in completed.stderr
    assert calls == []


def test_entrypoint_passes_other_commands_through(stub_imagen):
    completed, calls, pid = run_entrypoint(stub_imagen, ["imagen", "consume"])
    assert completed.returncode == 0, completed.stderr
    assert calls == [f"{pid} consume"]


# ------------------------------------------------------------------ compose.yaml


def test_imagen_service_reserves_nvidia_gpu(compose):
    devices = compose["services"]["imagen"]["deploy"]["resources"]["reservations"]["devices"]
    gpus = [device for device in devices if "gpu" in device["capabilities"]]
    assert len(gpus) == 1
    assert gpus[0]["driver"] == "nvidia"
    assert gpus[0]["count"] == "all"


def test_gpu_count_is_configurable():
    resolved = load_compose({"HOME": "/home/operator", "IMAGEN_GPUS": "1"})
    device = resolved["services"]["imagen"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["count"] == "1"


def test_every_published_port_binds_loopback(compose):
    ports = {name: published_ports(service) for name, service in compose["services"].items()}
    assert any(ports.values())
    for name, service_ports in ports.items():
        for port in service_ports:
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond 127.0.0.1"
        assert compose["services"][name].get("network_mode") != "host", f"{name} uses the host network"


def test_dashboard_and_serve_ports_are_published(compose):
    targets = {int(port["target"]) for port in published_ports(compose["services"]["imagen"])}
    assert 8265 in targets
    assert Settings().serve_http_port in targets


def test_env_file_defaults_to_go_worker_file(compose):
    for name in ("imagen", "migrate"):
        service = compose["services"][name]
        assert env_file_paths(service) == [f"/home/operator/{GO_WORKER_ENV_FILE}"]
        assert service["env_file"][0].get("required", True) is True


def test_env_file_follows_imagen_env_file():
    resolved = load_compose({"HOME": "/home/operator", "IMAGEN_ENV_FILE": "/etc/imagen/worker.env"})
    assert env_file_paths(resolved["services"]["imagen"]) == ["/etc/imagen/worker.env"]


def test_volumes_hold_data_and_cache(compose):
    environment = image_environment()
    mounts = dict(reversed(entry.split(":")[:2]) for entry in compose["services"]["imagen"]["volumes"])
    assert mounts[environment["IMAGEN_DATA_DIR"]] == "imagen-data"
    cache_mount = next(target for target, source in mounts.items() if source == "imagen-cache")
    assert environment["HF_HOME"].startswith(cache_mount + "/")
    assert environment["TORCHINDUCTOR_CACHE_DIR"].startswith(cache_mount + "/")
    assert {"imagen-data", "imagen-cache"} <= set(compose["volumes"])


def test_stop_grace_covers_shutdown(compose):
    from ray.serve._private.constants import DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S

    grace_s = duration_s(compose["services"]["imagen"]["stop_grace_period"])
    assert grace_s >= Settings().shutdown_grace_s + DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S + 10


def test_shm_size_holds_ray_object_store(compose):
    size = compose["services"]["imagen"]["shm_size"]
    match = re.fullmatch(r"(\d+)gb", size)
    assert match, f"shm_size {size!r} should be in gb"
    # Ray 2.60's default object store may grow to 10 GB whatever the size of
    # /dev/shm, and moves to disk when /dev/shm is smaller than the store.
    assert int(match.group(1)) * 2**30 > 10 * 10**9


def test_restart_policy_and_single_init(compose):
    service = compose["services"]["imagen"]
    assert service["restart"] == "unless-stopped"
    assert service.get("init") is not True, "the image already runs tini as PID 1"


def test_traces_go_to_jaeger_by_default(compose):
    environment = compose["services"]["imagen"]["environment"]
    assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
    # Consumers and replicas name themselves imagen-consumer and imagen-serve.
    assert "OTEL_SERVICE_NAME" not in environment
    jaeger = compose["services"]["jaeger"]
    assert "profiles" not in jaeger
    assert jaeger["environment"]["JAEGER_LISTEN_HOST"] == "0.0.0.0"
    assert {int(port["target"]) for port in published_ports(jaeger)} == {16686}


def test_default_profile_needs_no_profiled_service(compose):
    services = compose["services"]
    for name, service in services.items():
        if service.get("profiles"):
            continue
        for dependency, condition in service.get("depends_on", {}).items():
            if services[dependency].get("profiles"):
                assert condition.get("required") is False, (
                    f"{name} requires {dependency}, which is only in profiles {services[dependency]['profiles']}: "
                    "compose rejects the default project"
                )


def test_local_db_migrates_before_imagen(compose):
    services = compose["services"]
    assert services["postgres"]["profiles"] == ["local-db"]
    assert services["migrate"]["profiles"] == ["local-db"]
    assert services["migrate"]["command"] == ["imagen", "migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["imagen"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "healthcheck" in services["postgres"]


def test_local_db_env_matches_postgres(compose):
    values = dict(line.split("=", 1) for line in LOCAL_DB_ENV.read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    url = urlsplit(values["IMAGEN_WORKER_DATABASE_URL"])
    postgres = compose["services"]["postgres"]["environment"]
    assert url.hostname == "postgres"
    assert url.username == postgres["POSTGRES_USER"]
    assert url.password == postgres["POSTGRES_PASSWORD"]
    assert url.path == "/" + postgres["POSTGRES_DB"]
    assert Settings.from_env(values).database_url == values["IMAGEN_WORKER_DATABASE_URL"]


def test_metrics_profile_reads_ray_service_discovery(compose):
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    data_dir = image_environment()["IMAGEN_DATA_DIR"]
    services = compose["services"]
    assert services["prometheus"]["profiles"] == ["metrics"]
    assert services["grafana"]["profiles"] == ["metrics"]
    for name in ("prometheus", "grafana"):
        assert f"imagen-data:{data_dir}:ro" in services[name]["volumes"]

    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    files = [path for job in config["scrape_configs"] for sd in job["file_sd_configs"] for path in sd["files"]]
    # `imagen up` keeps Ray's temp dir at IMAGEN_DATA_DIR/ray (imagen.cluster.start_ray).
    assert files == [f"{data_dir}/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]

    dashboards = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "ray.yml").read_text())
    assert dashboards["providers"][0]["options"]["path"].startswith(f"{data_dir}/ray/session_latest/")
    datasources = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    assert datasources["datasources"][0]["isDefault"] is True


def test_imagen_variables_are_known_settings(compose, kuberay_documents):
    set_by_container = {
        "Dockerfile ENV": set(image_environment()),
        "compose.yaml": {key for service in compose["services"].values() for key in service.get("environment", {})},
        "docker/compose.multi-host.yaml": set(load_compose(path=MULTI_HOST_COMPOSE_FILE)["services"]["imagen"]
                                              ["environment"]),
        "docker/local-db.env": {line.split("=", 1)[0] for line in LOCAL_DB_ENV.read_text().splitlines()
                                if "=" in line and not line.startswith("#")},
        "docker/kuberay/rayservice.yaml": {key for document in kuberay_documents
                                           if document["kind"] == "ConfigMap" for key in document["data"]},
    }
    known = known_imagen_variables()
    for source, names in set_by_container.items():
        unknown = sorted(name for name in names if name.startswith("IMAGEN_") and name not in known)
        assert not unknown, f"{source} sets {unknown}, which neither imagen.settings nor serve_app.options reads"


# ------------------------------------------------------------------ multi-host compose


def test_multi_host_head_network_and_ports():
    head = load_compose(path=MULTI_HOST_COMPOSE_FILE)["services"]["imagen"]
    assert head["network_mode"] == "host"
    assert head["ports"] == [], "the base file's published ports must be reset under the host network"
    assert head["environment"]["RAY_GCS_SERVER_PORT"] == "6379"
    # On the host's network 0.0.0.0 would expose the dashboard on every interface.
    assert head["environment"]["IMAGEN_RAY_DASHBOARD_HOST"] == "127.0.0.1"
    assert head["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:4317"


def test_multi_host_jaeger_otlp_loopback():
    jaeger = load_compose(path=MULTI_HOST_COMPOSE_FILE)["services"]["jaeger"]
    assert [(port["host_ip"], int(port["target"])) for port in published_ports(jaeger)] == [("127.0.0.1", 4317)]


def test_ray_worker_joins_head_with_gpus():
    worker = load_compose({"RAY_HEAD_ADDRESS": "127.0.0.1:6379"}, RAY_WORKER_COMPOSE_FILE)["services"]["ray-worker"]
    assert worker["command"][:3] == ["ray", "start", "--address=127.0.0.1:6379"]
    assert "--block" in worker["command"]
    assert worker["network_mode"] == "host"
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert "imagen" not in " ".join(worker["healthcheck"]["test"]), "`imagen health` only passes on the head"
    cache_mount = next(entry.split(":")[1] for entry in worker["volumes"] if entry.startswith("imagen-cache:"))
    assert image_environment()["HF_HOME"].startswith(cache_mount + "/")


def test_ray_worker_requires_head_address():
    with pytest.raises(ValueError, match="RAY_HEAD_ADDRESS"):
        load_compose({}, RAY_WORKER_COMPOSE_FILE)


# ------------------------------------------------------------------ KubeRay


def test_kuberay_serve_config_valid(kuberay_documents):
    from ray.serve.schema import ServeDeploySchema

    from serve_app.deployment import APP_NAME, DEPLOYMENT_NAME

    service = next(document for document in kuberay_documents if document["kind"] == "RayService")
    schema = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    application = schema.applications[0]
    assert application.name == APP_NAME
    assert application.import_path == "imagen.container:build_app"
    assert [deployment.name for deployment in application.deployments] == [DEPLOYMENT_NAME]


def test_kuberay_pods_match_image_and_user(kuberay_documents):
    import ray

    service = next(document for document in kuberay_documents if document["kind"] == "RayService")
    consumers = next(document for document in kuberay_documents if document["kind"] == "Deployment")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__

    pod_specs = [cluster["headGroupSpec"]["template"]["spec"], consumers["spec"]["template"]["spec"]]
    pod_specs += [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    images = {container["image"] for spec in pod_specs for container in spec["containers"]}
    assert len(images) == 1
    for spec in pod_specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        mounts = {mount["mountPath"] for container in spec["containers"] for mount in container["volumeMounts"]}
        assert "/dev/shm" in mounts, "Kubernetes' default 64 MiB /dev/shm is too small for Ray"


def test_kuberay_consumers_exec_consume(kuberay_documents):
    consumers = next(document for document in kuberay_documents if document["kind"] == "Deployment")
    container = consumers["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in container, "`command` would bypass tini and the entrypoint"
    assert container["args"][-1].rstrip().endswith("exec imagen consume")
    assert consumers["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > Settings().shutdown_grace_s


def test_kuberay_gpu_worker_requests_one_gpu(kuberay_documents):
    service = next(document for document in kuberay_documents if document["kind"] == "RayService")
    for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"


# ------------------------------------------------------------------ imagen.container


def test_build_app_uses_settings_and_args(monkeypatch):
    from imagen.container import build_app

    monkeypatch.setenv("IMAGEN_SERVE_REPLICAS", "3")
    monkeypatch.setenv("IMAGEN_MODEL", "from-environment")
    deployment = build_app({"IMAGEN_MODEL": "tiny", "IMAGEN_SERVE_MAX_BATCH_SIZE": 8})._bound_deployment
    settings = Settings()
    assert deployment.num_replicas == 3
    assert deployment.max_ongoing_requests == settings.serve_max_ongoing_requests
    assert deployment.user_config == {"max_batch_size": 8,
                                      "batch_wait_timeout_s": settings.serve_batch_wait_timeout_s}
    assert deployment.ray_actor_options["num_gpus"] == 1
    assert "HF_HOME" in deployment.ray_actor_options["runtime_env"]["env_vars"]
    config = deployment.init_args[0]
    assert config.model == "tiny"
    assert config.device == "cuda"


def test_build_app_cpu_requests_no_gpu(monkeypatch):
    from imagen.container import build_app

    monkeypatch.setenv("IMAGEN_DEVICE", "cpu")
    deployment = build_app({})._bound_deployment
    assert deployment.ray_actor_options["num_gpus"] == 0
    assert deployment.init_args[0].device == "cpu"


def test_build_app_rejects_foreign_args():
    from imagen.container import build_app

    with pytest.raises(SettingsError, match="HF_TOKEN"):
        build_app({"HF_TOKEN": "placeholder"})


def test_build_app_rejects_unfillable_batches():
    from imagen.container import build_app

    with pytest.raises(SettingsError, match="IMAGEN_SERVE_MAX_ONGOING_REQUESTS"):
        build_app({"IMAGEN_SERVE_MAX_BATCH_SIZE": "8", "IMAGEN_SERVE_MAX_ONGOING_REQUESTS": "4"})


def test_build_app_takes_one_parameter():
    import inspect
    import types

    from imagen.container import build_app

    assert isinstance(build_app, types.FunctionType)
    assert len(inspect.signature(build_app).parameters) == 1


def test_build_app_keeps_process_environment():
    from imagen.container import build_app

    before = dict(os.environ)
    build_app({"IMAGEN_MODEL": "tiny"})
    assert dict(os.environ) == before
