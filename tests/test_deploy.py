"""Deployment files checked against the Compose specification and against the code.

No container engine runs here, so these tests check what can be checked without one:
`docker/compose.yaml` against the Compose JSON schema (vendored in tests/data/), every
command the images, services and pods run against `faceparse.cli.main` (click parses the
arguments), every environment variable against `Settings`, the health-check commands by
running them against a real Redis and real HTTP servers, and the Kubernetes/KEDA manifests
against each other and the queue contract.
"""

from __future__ import annotations

import copy
import hashlib
import http.server
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import jsonschema
import pytest
import redis
import yaml
from packaging.requirements import Requirement

from faceparse.cli import main as faceparse_cli
from faceparse.settings import Settings
from storage.queue import PARSE_QUEUE, WEBHOOK_QUEUE
from tests.fixtures.services import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
COMPOSE_FILE = DOCKER / "compose.yaml"
SCHEMA_FILE = ROOT / "tests" / "data" / "compose-spec.json"
SCHEMA_SHA256 = "bc50c2d79102aed8df21b3a13e56c9396c7a06da6cff5ce37629f2ee7eb41735"
DOCKERFILES = {"api": DOCKER / "Dockerfile.api", "worker": DOCKER / "Dockerfile.worker"}

SETTINGS_ENV = {f"FACEPARSE_{name.upper()}" for name in Settings.model_fields}
# Hugging Face's own variables, allowed where model caching is configured (like AWS_* for boto3).
HF_ENV = {"HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN"}


# --- helpers: environment ----------------------------------------------------------------
def is_settings_or_aws(name: str) -> bool:
    """A variable the project reads: a `Settings` field or one of boto3's AWS_* variables."""
    return name in SETTINGS_ENV or name.startswith("AWS_")


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Build `Settings` from exactly these FACEPARSE_* variables (validation errors propagate)."""
    for key in list(os.environ):
        if key.startswith("FACEPARSE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("FACEPARSE_"):
            monkeypatch.setenv(key, str(value))
    return Settings()


def env_file_entries(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file, commented-out examples included."""
    entries: dict[str, str] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if m:
            entries[m.group(1)] = m.group(2)
    return entries


# --- helpers: compose ----------------------------------------------------------------------
_VAR = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(value: Any, env: dict[str, str], missing: list[str] | None = None) -> Any:
    """Compose's variable interpolation (`${VAR:-default}`, `$$`), applied to every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, missing) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg, current = m.group("op"), m.group("arg") or "", env.get(name)
        if op == ":-":
            return current or arg
        if op == "-":
            return arg if current is None else current
        if op in (":?", "?") and not current:
            raise ValueError(f"required variable {name} is not set: {arg}")
        if op in (":+", "+"):
            return arg if current else ""
        if current is None and missing is not None:
            missing.append(name)
        return current or ""

    return _VAR.sub(sub, value)


def compose_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose model as `docker compose config` would see it with no .env file."""
    return interpolate(compose_raw(), env={})


def project_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services built from this repository's Dockerfiles (the others run upstream images)."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def service_env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def argv_of(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def healthcheck_argv(test: str | list[str]) -> list[str]:
    """The argv a compose `healthcheck.test` runs (CMD form directly, CMD-SHELL via sh -c)."""
    if isinstance(test, str):
        return ["/bin/sh", "-c", test]
    kind, *rest = test
    if kind == "CMD":
        return rest
    assert kind == "CMD-SHELL", f"healthcheck test must start with CMD or CMD-SHELL: {test}"
    return ["/bin/sh", "-c", rest[0]]


def seconds(duration: str) -> float:
    """A compose duration such as '7m', '1m30s', '500ms' in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- helpers: Dockerfiles ------------------------------------------------------------------
@dataclass(frozen=True)
class Instruction:
    stage: str
    keyword: str
    value: str


@dataclass(frozen=True)
class Dockerfile:
    args: dict[str, str]  # global ARG defaults (before the first FROM)
    instructions: list[Instruction]

    def stage(self, name: str) -> list[Instruction]:
        """The instructions of a stage, with those it inherits through `FROM <stage>`."""
        own = [i for i in self.instructions if i.stage == name]
        base = own[0].value.split()[0]
        inherited = self.stage(base) if base in self.stages() else []
        return inherited + own

    def stages(self) -> list[str]:
        return list(dict.fromkeys(i.stage for i in self.instructions))

    def base_image(self, name: str) -> str:
        """The external image a stage starts from, with ARG defaults substituted."""
        base = self.stage(name)[0].value.split()[0]
        return interpolate(base, self.args)

    def last(self, name: str, keyword: str) -> Instruction | None:
        found = [i for i in self.stage(name) if i.keyword == keyword]
        return found[-1] if found else None


def parse_dockerfile(path: Path) -> Dockerfile:
    """Logical instructions (continuations joined, comments dropped) tagged with their stage."""
    logical: list[str] = []
    buf = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue  # comments (and parser directives) also may sit inside a continuation
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append(buf + stripped)
        buf = ""
    assert not buf, f"{path}: dangling line continuation"

    args: dict[str, str] = {}
    instructions: list[Instruction] = []
    stage: str | None = None
    for text in logical:
        keyword, _, value = text.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if keyword == "FROM":
            m = re.match(r"^(\S+)(?:\s+AS\s+(\S+))?$", value, re.IGNORECASE)
            assert m, f"{path}: cannot read FROM {value!r}"
            stage = m.group(2) or str(len({i.stage for i in instructions}))
        elif stage is None:
            assert keyword == "ARG", f"{path}: only ARG may precede FROM, found {keyword}"
            name, _, default = value.partition("=")
            args[name] = default
            continue
        instructions.append(Instruction(stage, keyword, value))
    return Dockerfile(args, instructions)


def exec_form(value: str) -> list[str]:
    """argv of a CMD/ENTRYPOINT/HEALTHCHECK CMD value (JSON exec form, or shell form)."""
    return json.loads(value) if value.startswith("[") else ["/bin/sh", "-c", value]


def dockerfile_healthcheck_argv(instruction: Instruction) -> list[str]:
    m = re.fullmatch(r"(?:--\S+\s+)*CMD\s+(.+)", instruction.value)
    assert m, f"HEALTHCHECK must use CMD: {instruction.value}"
    return exec_form(m.group(1).strip())


def pip_installs(dockerfile: Dockerfile, stage: str) -> list[str]:
    """The argument lists of every `pip install` a stage (and what it inherits) runs."""
    found = []
    for ins in dockerfile.stage(stage):
        if ins.keyword != "RUN":
            continue
        lexer = shlex.shlex(ins.value, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        commands: list[list[str]] = [[]]
        for token in lexer:
            if token in {"&&", "||", ";", "|"}:
                commands.append([])
            else:
                commands[-1].append(token)
        for words in commands:
            if words[:2] == ["pip", "install"] or words[1:4] == ["-m", "pip", "install"]:
                found.append(" ".join(words[words.index("install") + 1 :]))
    return found


# --- helpers: commands ---------------------------------------------------------------------
def check_faceparse_argv(argv: list[str]) -> None:
    """Parse argv with faceparse's own click group: unknown verbs, options or bad types raise."""
    assert argv[0] == "faceparse"
    command: click.Command = faceparse_cli
    args = argv[1:]
    path = ["faceparse"]
    while isinstance(command, click.Group):
        assert args, f"{' '.join(path)} needs a sub-command"
        with click.Context(command) as ctx:
            sub = command.get_command(ctx, args[0])
        if sub is None:
            raise click.UsageError(f"no such command {' '.join([*path, args[0]])}")
        path.append(args.pop(0))
        command = sub
    # make_context parses and converts every option without running the command.
    command.make_context(" ".join(path), list(args))


def check_python_c(argv: list[str]) -> None:
    """`python -c CODE`: CODE compiles and every module it imports is installed."""
    assert argv[:2] == ["python", "-c"] and len(argv) == 3, argv
    code = argv[2]
    compile(code, "<healthcheck>", "exec")
    for names in re.findall(r"^\s*import\s+([\w., ]+)", code, re.MULTILINE):
        for module in (n.strip().split(".")[0] for n in names.split(",")):
            assert importlib.util.find_spec(module), f"module {module} is not installed"


def check_celery_argv(argv: list[str], image_has_flower: bool) -> None:
    """`celery [global options] SUBCOMMAND ...`: celery's click group parses the options."""
    from celery.bin.celery import celery as celery_cli

    ctx = celery_cli.make_context("celery", list(argv[1:]))
    rest = [*ctx.protected_args, *ctx.args]
    assert rest, "celery needs a sub-command"
    if rest[0] == "flower":
        # flower registers itself as a celery sub-command; it is installed in the image only.
        assert image_has_flower, "the image runs `celery flower` but does not install flower"
    else:
        assert rest[0] in celery_cli.commands, f"celery has no sub-command {rest[0]}"


def check_project_argv(argv: list[str], image_has_flower: bool = False) -> None:
    """Any command a project image runs must be one of the project's own, or python/celery."""
    if argv[0] == "faceparse":
        check_faceparse_argv(argv)
    elif argv[:2] == ["python", "-c"]:
        check_python_c(argv)
    elif argv[0] == "celery":
        check_celery_argv(argv, image_has_flower)
    elif argv[:2] == ["/bin/sh", "-c"]:
        check_project_argv(shlex.split(argv[2].removeprefix("exec ")), image_has_flower)
    else:
        raise AssertionError(f"unknown program in a project image: {argv}")


# --- helpers: Kubernetes ------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append({**doc, "_file": path.name})
    return docs


def find(manifests: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind and name in (None, m["metadata"]["name"])]


def pod_containers(manifests: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for dep in find(manifests, "Deployment"):
        spec = dep["spec"]["template"]["spec"]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            yield dep["metadata"]["name"], container


# --- helpers: live services for the health checks ----------------------------------------
@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway redis-server (never the shared one on 6379)."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("redis"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def http_stub() -> Iterator[tuple[str, dict[str, int]]]:
    """An HTTP server answering each path with the status set in the returned dict (else 404)."""
    statuses: dict[str, int] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status = statuses.get(self.path, 404)
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", statuses
    server.shutdown()
    server.server_close()


def run_snippet(code: str, env: dict[str, str] | None = None) -> int:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FACEPARSE_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          timeout=60).returncode


def python_healthchecks() -> list[tuple[str, str]]:
    """(where, code) of every `python -c` health check in compose, Dockerfiles and pods."""
    found: list[tuple[str, str]] = []
    compose = interpolate(compose_raw(), env={})
    for name, svc in project_services(compose).items():
        argv = healthcheck_argv(svc["healthcheck"]["test"])
        if argv[:2] == ["python", "-c"]:
            found.append((f"compose:{name}", argv[2]))
    for path in DOCKERFILES.values():
        dockerfile = parse_dockerfile(path)
        for stage in dockerfile.stages():
            ins = dockerfile.last(stage, "HEALTHCHECK")
            if ins is not None:
                argv = dockerfile_healthcheck_argv(ins)
                if argv[:2] == ["python", "-c"]:
                    found.append((f"{path.name}:{stage}", argv[2]))
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Deployment":
                for container in doc["spec"]["template"]["spec"]["containers"]:
                    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                        argv = container.get(probe, {}).get("exec", {}).get("command", [])
                        if argv[:2] == ["python", "-c"]:
                            found.append((f"{path.name}:{container['name']}:{probe}", argv[2]))
    return found


HEALTHCHECKS = python_healthchecks()


# ===========================================================================================
# Compose
# ===========================================================================================
def test_vendored_schema_is_the_recorded_upstream_copy() -> None:
    assert hashlib.sha256(SCHEMA_FILE.read_bytes()).hexdigest() == SCHEMA_SHA256
    assert SCHEMA_SHA256 in (SCHEMA_FILE.parent / "compose-spec.SOURCE.md").read_text()


def test_compose_file_matches_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft7Validator(schema)
    for model in (compose_raw(), compose):
        errors = sorted(validator.iter_errors(model), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)

    # The schema really constrains what we use: a GPU reservation without capabilities,
    # or a misspelt service key, is rejected.
    broken = copy.deepcopy(compose)
    del broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"]
    assert not validator.is_valid(broken)
    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["healthchek"] = broken["services"]["worker"].pop("healthcheck")
    assert not validator.is_valid(broken)


def test_compose_needs_no_variables_set() -> None:
    """Every ${VAR} has a default, so `docker compose up` works without a .env file."""
    missing: list[str] = []
    interpolate(compose_raw(), env={}, missing=missing)
    assert missing == []


def test_every_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        check = svc.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        assert healthcheck_argv(check["test"]), name


def test_redis_keeps_an_append_only_file(compose: dict[str, Any]) -> None:
    redis_svc = compose["services"]["redis"]
    argv = argv_of(redis_svc["command"])
    assert argv[0] == "redis-server"
    assert argv[argv.index("--appendonly") + 1] == "yes"
    volume = next(v for v in redis_svc["volumes"] if v.endswith(":/data"))
    assert volume.split(":")[0] in compose["volumes"]


def test_worker_scales_and_reserves_a_gpu(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    # `--scale worker=N` fails on a fixed container name or host port.
    assert "container_name" not in worker and "hostname" not in worker
    assert "ports" not in worker
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    gpu = next(d for d in devices if d.get("driver") == "nvidia")
    assert "gpu" in gpu["capabilities"]
    assert gpu.get("count") == "all" or int(gpu["count"]) >= 1
    assert "device_ids" not in gpu  # count and device_ids are exclusive; ids pin every replica


def test_worker_stop_grace_outlasts_a_running_job(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = compose["services"]["worker"]
    settings = settings_from(service_env(worker), monkeypatch)
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"  # Celery's warm shutdown
    assert seconds(worker["stop_grace_period"]) > settings.task_time_limit


def test_bucket_init_creates_the_storage_bucket(compose: dict[str, Any]) -> None:
    services = compose["services"]
    init = services["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    script = " ".join(argv_of(init["entrypoint"]) + argv_of(init["command"]))
    for name, svc in project_services(compose).items():
        env = service_env(svc)
        if "FACEPARSE_STORAGE_URL" not in env:
            continue
        url = urlsplit(env["FACEPARSE_STORAGE_URL"])
        assert url.scheme == "s3"
        assert re.search(rf"mc mb --ignore-existing local/{re.escape(url.netloc)}\b", script), name
        assert svc["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert env["AWS_ACCESS_KEY_ID"] == service_env(services["minio"])["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == service_env(services["minio"])["MINIO_ROOT_PASSWORD"]


def test_model_cache_volume_is_the_worker_images_hf_home(compose: dict[str, Any]) -> None:
    dockerfile = parse_dockerfile(DOCKERFILES["worker"])
    env_line = " ".join(i.value for i in dockerfile.stage("worker") if i.keyword == "ENV")
    hf_home = re.search(r"\bHF_HOME=(\S+)", env_line).group(1)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["worker"]["volumes"]}
    assert mounts[hf_home] in compose["volumes"], "HF_HOME must be a named volume"


def test_flower_watches_the_workers_broker(compose: dict[str, Any]) -> None:
    argv = argv_of(compose["services"]["flower"]["command"])
    assert argv[0] == "celery" and "flower" in argv
    broker = argv[argv.index("--broker") + 1]
    assert broker == service_env(compose["services"]["worker"])["FACEPARSE_REDIS_URL"]


def test_service_environments_are_real_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, svc in project_services(compose).items():
        env = service_env(svc)
        unknown = sorted(k for k in env if not is_settings_or_aws(k))
        assert unknown == [], f"{name}: not Settings fields nor AWS_*: {unknown}"
        settings_from(env, monkeypatch)  # the values validate too
        for env_file in svc.get("env_file", []):
            path = env_file["path"] if isinstance(env_file, dict) else env_file
            assert (DOCKER / f"{path}.example").exists() or (DOCKER / path).exists(), path


def test_env_file_example_names_and_values_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = env_file_entries(DOCKER / "faceparse.env.example")
    assert "FACEPARSE_API_KEYS" in entries and "FACEPARSE_MAX_BATCH" in entries
    unknown = sorted(k for k in entries if not (is_settings_or_aws(k) or k in HF_ENV))
    assert unknown == []
    settings = settings_from(entries, monkeypatch)
    assert settings.visibility_timeout > settings.task_time_limit
    settings.tenant_keys()


def test_compose_commands_are_real(compose: dict[str, Any]) -> None:
    for name, svc in project_services(compose).items():
        target = svc["build"].get("target")
        dockerfile = parse_dockerfile(ROOT / svc["build"]["dockerfile"])
        stage = target or dockerfile.stages()[-1]
        assert stage in dockerfile.stages(), f"{name}: no stage {stage}"
        has_flower = any("flower" in args for args in pip_installs(dockerfile, stage))
        check_project_argv(argv_of(svc["command"]), image_has_flower=has_flower)
        check_project_argv(healthcheck_argv(svc["healthcheck"]["test"]), has_flower)
    # The services run the verbs the issue names.
    assert argv_of(compose["services"]["api"]["command"])[:2] == ["faceparse", "api"]
    worker_argv = argv_of(compose["services"]["worker"]["command"])
    assert worker_argv[:2] == ["faceparse", "worker"]
    queues = worker_argv[worker_argv.index("--queues") + 1].split(",")
    assert set(queues) == {PARSE_QUEUE, WEBHOOK_QUEUE}


@pytest.mark.parametrize(
    "argv",
    [
        ["faceparse", "serve"],
        ["faceparse", "api", "--threads", "4"],
        ["faceparse", "api", "--workers", "two"],
        ["faceparse", "model", "init-random"],
        ["python", "-c", "import not_a_module_here"],
        ["python", "-c", "import ("],
        ["gunicorn", "api:app"],
        ["celery", "--broker", "redis://redis:6379/0", "flower"],  # image without flower
    ],
)
def test_command_check_rejects_what_does_not_exist(argv: list[str]) -> None:
    with pytest.raises((click.ClickException, AssertionError, SyntaxError)):
        check_project_argv(argv, image_has_flower=False)


# ===========================================================================================
# Dockerfiles
# ===========================================================================================
def test_api_image_installs_no_torch() -> None:
    dockerfile = parse_dockerfile(DOCKERFILES["api"])
    assert not dockerfile.base_image("api").startswith("pytorch/")
    installs = pip_installs(dockerfile, "api")
    assert installs == ["."], installs  # base dependencies only, no [worker] extra
    base = [Requirement(r).name for r in tomllib.loads((ROOT / "pyproject.toml").read_text())
            ["project"]["dependencies"]]
    assert not {"torch", "transformers", "safetensors", "torchvision"} & set(base)


def test_worker_image_is_a_cuda_pytorch_runtime_running_as_non_root() -> None:
    dockerfile = parse_dockerfile(DOCKERFILES["worker"])
    stage = dockerfile.stages()[-1]
    image = dockerfile.base_image(stage)
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda12\.\d+-cudnn9-runtime", image)
    assert m, image
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    torch_req = next(Requirement(r) for r in extras["worker"] if Requirement(r).name == "torch")
    assert torch_req.specifier.contains(m.group(1)), "the base image's torch must satisfy [worker]"
    installs = pip_installs(dockerfile, stage)
    assert any(i.split()[-1] == ".[worker]" for i in installs), installs
    assert all("--constraint" in i for i in installs if "[worker]" in i), "pin the image's torch"
    user = dockerfile.last(stage, "USER").value.split(":")[0]
    assert user not in {"root", "0"}


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_commands_are_real(image: str) -> None:
    dockerfile = parse_dockerfile(DOCKERFILES[image])
    for stage in dockerfile.stages():
        has_flower = any("flower" in args for args in pip_installs(dockerfile, stage))
        cmd = dockerfile.last(stage, "CMD")
        assert cmd is not None and dockerfile.last(stage, "ENTRYPOINT") is None
        check_project_argv(exec_form(cmd.value), image_has_flower=has_flower)
        check_project_argv(dockerfile_healthcheck_argv(dockerfile.last(stage, "HEALTHCHECK")),
                           image_has_flower=has_flower)
        user = dockerfile.last(stage, "USER")
        assert user is not None and user.value.split(":")[0] not in {"root", "0"}, stage


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent wins."""
    ignored = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_copies_exist_and_reach_the_build_context(image: str) -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    dockerfile = parse_dockerfile(DOCKERFILES[image])
    sources = []
    for ins in dockerfile.instructions:
        if ins.keyword in {"COPY", "ADD"}:
            words = [w for w in ins.value.split() if not w.startswith("--")]
            assert "--from" not in ins.value
            sources += words[:-1]
    assert "pyproject.toml" in sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"{source} is not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel:
                assert not dockerignored(rel, patterns), f"{rel} is excluded by .dockerignore"
    # And the allow-list keeps local clutter out of the context.
    for clutter in (".venv/bin/python", ".git/HEAD", "faceparse-data/jobs/x/mask.png",
                    "tests/test_deploy.py", "api/__pycache__/x.cpython-311.pyc"):
        assert dockerignored(clutter, patterns), clutter


# ===========================================================================================
# Health checks, run for real
# ===========================================================================================
def test_healthchecks_were_found() -> None:
    places = {where.split(":")[0] for where, _ in HEALTHCHECKS}
    assert {"compose", "Dockerfile.api", "Dockerfile.worker", "worker.yaml"} <= places


@pytest.mark.parametrize(("where", "code"), HEALTHCHECKS, ids=[w for w, _ in HEALTHCHECKS])
def test_healthcheck_passes_when_up_and_fails_when_down(
    where: str, code: str, redis_url: str, http_stub: tuple[str, dict[str, int]]
) -> None:
    if "urlopen" in code:
        base, statuses = http_stub
        m = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]*)", code)
        assert m, code
        port, path = int(m.group(1)), m.group(2)
        expected = {8000: "/healthz", 5555: "/healthcheck"}[port]  # API (DESIGN.md) and Flower
        assert path == expected, where
        local = code.replace(f"http://127.0.0.1:{port}", base)
        statuses[path] = 200
        assert run_snippet(local) == 0
        statuses[path] = 503
        assert run_snippet(local) != 0
        del statuses[path]
        assert run_snippet(local) != 0
    else:
        assert "redis" in code and "ping()" in code, where
        assert run_snippet(code, {"FACEPARSE_REDIS_URL": redis_url}) == 0
        dead = f"redis://127.0.0.1:{free_port()}/0"
        assert run_snippet(code, {"FACEPARSE_REDIS_URL": dead}) != 0


# ===========================================================================================
# Kubernetes and KEDA
# ===========================================================================================
def test_manifests_load_and_name_themselves(manifests: list[dict[str, Any]]) -> None:
    assert manifests
    for doc in manifests:
        assert doc.get("apiVersion") and doc.get("kind"), doc["_file"]
        assert doc.get("metadata", {}).get("name"), doc["_file"]
    kinds = {m["kind"] for m in manifests}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "ScaledObject"} <= kinds


def test_kustomization_lists_every_manifest(manifests: list[dict[str, Any]]) -> None:
    kustomization = find(manifests, "Kustomization")[0]
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_api_service_selects_the_api_pods(manifests: list[dict[str, Any]]) -> None:
    api = find(manifests, "Deployment", "faceparse-api")[0]
    service = find(manifests, "Service", "faceparse-api")[0]
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    container = api["spec"]["template"]["spec"]["containers"][0]
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def k8s_settings_env(manifests: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            cm = find(manifests, "ConfigMap", source["configMapRef"]["name"])
            assert cm, f"no ConfigMap {source['configMapRef']['name']}"
            env.update(cm[0]["data"])
        if "secretRef" in source:
            secret = find(manifests, "Secret", source["secretRef"]["name"])
            assert secret, f"no Secret {source['secretRef']['name']}"
            env.update(secret[0].get("stringData", {}))
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def test_pod_environments_are_real_settings(
    manifests: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for kind in ("ConfigMap", "Secret"):
        for doc in find(manifests, kind):
            names = [*doc.get("data", {}), *doc.get("stringData", {})]
            unknown = sorted(n for n in names if not is_settings_or_aws(n))
            assert unknown == [], f"{doc['metadata']['name']}: {unknown}"
    for deployment, container in pod_containers(manifests):
        names = [e["name"] for e in container.get("env", [])]
        assert all(is_settings_or_aws(n) for n in names), (deployment, names)
        settings_from(k8s_settings_env(manifests, container), monkeypatch)


def test_pod_commands_are_real_verbs(manifests: list[dict[str, Any]]) -> None:
    verbs = {}
    for deployment, container in pod_containers(manifests):
        argv = [*container.get("command", []), *container.get("args", [])]
        assert argv, f"{deployment}: give the command explicitly"
        check_project_argv(argv)
        verbs[deployment] = argv[1]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if "exec" in container.get(probe, {}):
                check_project_argv(container[probe]["exec"]["command"])
    assert sorted(verbs.values()) == ["api", "worker"]


def test_worker_requests_a_gpu_and_outlives_its_jobs(
    manifests: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = find(manifests, "Deployment", "faceparse-worker")[0]
    pod = worker["spec"]["template"]["spec"]
    container = pod["containers"][0]
    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    # Extended resources cannot be overcommitted: a request must equal the limit.
    assert resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"]) == \
        resources["limits"]["nvidia.com/gpu"]
    settings = settings_from(k8s_settings_env(manifests, container), monkeypatch)
    assert pod["terminationGracePeriodSeconds"] > settings.task_time_limit
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    # The model cache is mounted where the worker image's HF_HOME points.
    dockerfile = parse_dockerfile(DOCKERFILES["worker"])
    env_line = " ".join(i.value for i in dockerfile.stage("worker") if i.keyword == "ENV")
    hf_home = re.search(r"\bHF_HOME=(\S+)", env_line).group(1)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == hf_home)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert find(manifests, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])


def test_scaledobject_scales_the_workers_on_the_parse_queue(manifests: list[dict[str, Any]]) -> None:
    scaled = find(manifests, "ScaledObject")[0]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    worker = find(manifests, "Deployment", target["name"])
    assert worker, f"scaleTargetRef names no Deployment: {target['name']}"
    worker_argv = worker[0]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert worker_argv[1] == "worker"

    trigger = next(t for t in spec["triggers"] if t["type"] == "redis")["metadata"]
    assert trigger["listName"] == PARSE_QUEUE
    assert int(trigger["listLength"]) > 0
    # KEDA must watch the very Redis and database the workers consume from.
    redis_url = urlsplit(find(manifests, "ConfigMap", "faceparse-config")[0]["data"]["FACEPARSE_REDIS_URL"])
    assert trigger["address"] == f"{redis_url.hostname}:{redis_url.port or 6379}"
    assert trigger.get("databaseIndex", "0") == (redis_url.path.strip("/") or "0")

    # The scaled workers also deliver webhooks; at zero replicas nothing else would.
    queues = worker_argv[worker_argv.index("--queues") + 1].split(",")
    if WEBHOOK_QUEUE in queues:
        assert spec["minReplicaCount"] >= 1
    assert spec["maxReplicaCount"] >= spec["minReplicaCount"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert 0 < behavior["scaleDown"]["stabilizationWindowSeconds"] <= 3600  # the HPA's maximum


# ===========================================================================================
# Docs
# ===========================================================================================
def test_deploy_doc_commands_are_real() -> None:
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.DOTALL)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("faceparse "):
                commands.append(shlex.split(line.split("#")[0]))
    assert len(commands) >= 2
    for argv in commands:
        check_faceparse_argv(argv)
    for needed in ("--scale worker=", "nvidia.com/gpu", "unacked", "HF_HOME", "flower"):
        assert needed in text, needed
