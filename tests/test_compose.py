"""docker-compose.yml and the Dockerfile, checked without a Docker engine: every command a service
runs exists in this package and parses, and the deployment keeps the pool's invariants (one shared
data volume, migrations once, healthchecks)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from api import job_events, metrics
from orchestration.app import MATCHING_QUEUE, QUEUES
from pool.settings import Settings
from tests.harness import REPO

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
OURS = sorted(name for name, service in SERVICES.items() if "build" in service)
POOL_PROCESSES = ("grpc", "matcher", "worker", "beat", "flower")


def typer_command(script: str) -> Any:
    """The click command behind console script ``script`` (a typer app in its module)."""
    module = importlib.import_module(SCRIPTS[script].split(":")[0])
    (app,) = [value for value in vars(module).values() if isinstance(value, typer.Typer)]
    return typer.main.get_command(app)


def check_celery(argv: list[str]) -> None:
    from celery.bin.celery import celery
    from flower.options import options as flower_options

    assert argv[1:3] in (["-A", "orchestration"], ["--app", "orchestration"]), argv
    assert importlib.import_module("orchestration.celery").app is not None
    name, rest = argv[3], argv[4:]
    assert name in celery.commands, f"celery has no subcommand {name!r}"
    flags = [arg.split("=")[0] for arg in rest if arg.startswith("-")]
    if name == "flower":  # tornado options, passed through unparsed
        unknown = [f for f in flags if not hasattr(flower_options, f.lstrip("-").replace("-", "_"))]
    else:
        known = {opt for param in celery.commands[name].params for opt in param.opts}
        unknown = [f for f in flags if f not in known]
    assert not unknown, f"celery {name} does not take {unknown}"


def check_argv(argv: list[str]) -> None:
    """Fail unless ``argv`` names something this package provides, with arguments it accepts."""
    program = argv[0]
    if program in SCRIPTS:
        group = typer_command(program)
        assert argv[1] in group.commands, f"{program} has no command {argv[1]!r}"
        group.commands[argv[1]].make_context(argv[1], list(argv[2:]))  # raises on unknown options or bad values
    elif program == "celery":
        check_celery(argv)
    elif program == "python" and argv[1] == "-m":
        assert importlib.util.find_spec(argv[2]) is not None, argv
    elif program == "python" and argv[1] == "-c":
        compile(argv[2], "<healthcheck>", "exec")
    else:
        raise AssertionError(f"{argv} runs nothing this package provides")


@pytest.mark.parametrize("name", OURS)
def test_every_service_command_exists_in_the_package(name: str) -> None:
    command = SERVICES[name].get("command")
    assert isinstance(command, list) and command, f"{name}: give the command as a list"
    check_argv([str(part) for part in command])


@pytest.mark.parametrize("name", [n for n in OURS if "healthcheck" in SERVICES[n]])
def test_every_healthcheck_of_ours_runs_something_we_ship(name: str) -> None:
    test = SERVICES[name]["healthcheck"]["test"]
    kind, rest = test[0], test[1:]
    argv = shlex.split(rest[0]) if kind == "CMD-SHELL" else rest
    assert kind in ("CMD", "CMD-SHELL")
    check_argv(argv)


def test_long_running_services_have_healthchecks_and_dependencies_exist() -> None:
    for name in ("postgres", "redis", "grpc", "matcher", "worker", "flower", "agent"):
        assert "healthcheck" in SERVICES[name], name
    for name, service in SERVICES.items():
        for needed, spec in _depends(service).items():
            assert needed in SERVICES, f"{name} depends on unknown {needed}"
            condition = spec.get("condition", "service_started")
            assert condition in ("service_started", "service_healthy", "service_completed_successfully")
            assert condition != "service_healthy" or "healthcheck" in SERVICES[needed], f"{needed} has no check"


def _depends(service: dict[str, Any]) -> dict[str, dict[str, str]]:
    found = service.get("depends_on", {})
    return {name: {} for name in found} if isinstance(found, list) else found


def test_migrations_run_once_before_the_pool_starts() -> None:
    migrate = SERVICES["migrate"]
    assert migrate["command"] == ["hivemind-pool", "migrate"] and migrate["restart"] == "no"
    for name in POOL_PROCESSES:
        assert _depends(SERVICES[name])["migrate"]["condition"] == "service_completed_successfully", name


def test_pool_processes_share_one_data_volume_and_the_signing_key() -> None:
    """Workers sign dispatches with the key the gRPC server publishes, and read the zips it stored."""
    mounts = {name: SERVICES[name]["volumes"] for name in POOL_PROCESSES}
    assert all(volumes == ["pooldata:/data"] for volumes in mounts.values()), mounts
    assert all(SERVICES[name]["environment"]["DATA_DIR"] == "/data" for name in POOL_PROCESSES)
    assert "pooldata" in COMPOSE["volumes"]
    for name in ("matcher", "worker"):
        assert _depends(SERVICES[name])["grpc"]["condition"] == "service_healthy"  # the key exists first


def queues_of(argv: list[str]) -> list[str]:
    return argv[argv.index("-Q") + 1].split(",") if "-Q" in argv else []


def test_every_queue_has_workers_and_matching_a_worker_of_its_own() -> None:
    workers = {name: [str(a) for a in s["command"]] for name, s in SERVICES.items() if "worker" in s.get("command", [])}
    assert sorted(q for argv in workers.values() for q in queues_of(argv)) == sorted(QUEUES)
    matcher = workers["matcher"]
    assert queues_of(matcher) == [MATCHING_QUEUE] and matcher[matcher.index("-c") + 1] == "1"


def test_the_agent_reaches_the_pool_by_its_service_name() -> None:
    command = SERVICES["agent"]["command"]
    pool = command[command.index("--pool") + 1]
    host, port = pool.split(":")
    assert host in SERVICES and f"{port}:{port}" in SERVICES[host]["ports"]
    assert command[command.index("--host") + 1] == "agent"
    assert {"HIVEMIND_USERNAME", "HIVEMIND_PASSWORD"} <= set(SERVICES["agent"]["environment"])


def test_the_image_holds_every_package_and_flowers_config() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    packages = [pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
    for package in [*packages, "deploy"]:
        assert re.search(rf"^COPY {package} {package}$", dockerfile, re.M), f"the image lacks {package}/"
    assert "WORKDIR /app" in dockerfile
    conf = next(a for a in SERVICES["flower"]["command"] if a.startswith("--conf="))
    assert (REPO / conf.removeprefix("--conf=/app/")).is_file()
    assert "FLOWER_BASIC_AUTH" in SERVICES["flower"]["environment"]


def test_metrics_are_published_and_scraped_where_the_server_serves_them() -> None:
    port = Settings.model_fields["METRICS_PORT"].default
    assert f"{port}:{port}" in SERVICES["grpc"]["ports"]
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == [f"grpc:{port}"]


def test_the_dashboard_plots_only_metrics_we_export() -> None:
    dashboard = json.loads((REPO / "deploy" / "grafana" / "hivemind-pool.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {re.sub(r"_(bucket|count|sum)$", "", name) for e in exprs for name in re.findall(r"hivemind_\w+", e)}
    sources = "".join(Path(module.__file__).read_text() for module in (metrics, job_events))  # type: ignore[arg-type]
    exported = set(re.findall(r'"(hivemind_\w+)"', sources))
    assert used and used <= {name.removesuffix("_total") for name in exported} | exported, used - exported
