"""Measuring the machine: the CPU score, GPUs from nvidia-smi's output, Docker's status."""

from __future__ import annotations

import time

import psutil
import pytest

from agent import machine
from agent.machine import Gpu


def test_measuring_this_machine() -> None:
    start = time.monotonic()
    found = machine.measure(location="Europe/Berlin", benchmark_seconds=0.2)

    assert time.monotonic() - start < 10
    assert found.cpu_cores == psutil.cpu_count()
    assert found.memory_gb == psutil.virtual_memory().total // 2**30
    assert 10 < found.cpu_score < 100_000
    assert found.docker_status == ("enabled" if machine.docker_available() else "disabled")
    assert found.location == "Europe/Berlin"


def test_the_cpu_score_scales_with_cores_and_takes_at_most_a_second() -> None:
    start = time.monotonic()
    one, four = machine.cpu_score(1, seconds=0.3), machine.cpu_score(4, seconds=5.0)

    assert time.monotonic() - start < 1.6
    assert 2.5 < four / one < 5.5  # the same core measured twice, noise allowed


def test_without_docker_wanted_the_node_says_disabled() -> None:
    assert machine.measure(use_docker=False, benchmark_seconds=0.05).docker_status == "disabled"


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("NVIDIA GeForce RTX 4090, 24564 MiB\n", [Gpu("NVIDIA GeForce RTX 4090", 24)]),
        ("Tesla T4, 15360 MiB\nTesla T4, 15360 MiB\n", [Gpu("Tesla T4", 15), Gpu("Tesla T4", 15)]),
        ("NVIDIA A100-SXM4-80GB, 81920 MiB", [Gpu("NVIDIA A100-SXM4-80GB", 80)]),
        ("Odd, Name, 8 GiB", [Gpu("Odd, Name", 8)]),
        ("NVIDIA-SMI has failed because it couldn't communicate with the driver.", []),
        ("GPU, [N/A]", []),
        ("", []),
    ],
)
def test_nvidia_smi_output_is_read(output: str, expected: list[Gpu]) -> None:
    assert machine.parse_nvidia_smi(output) == expected


@pytest.mark.parametrize(
    ("gpu", "score"),
    [
        (None, 0),
        (Gpu("NVIDIA GeForce RTX 4090", 24), 2000),
        (Gpu("NVIDIA A100-SXM4-80GB", 80), 4500),
        (Gpu("Some Future GPU", 12), 1200),
    ],
)
def test_gpu_scores_come_from_known_models_or_memory(gpu: Gpu | None, score: int) -> None:
    assert machine.gpu_score(gpu) == score
