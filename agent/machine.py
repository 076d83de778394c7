"""What this machine offers the pool: cores, memory, a CPU score, GPUs, Docker, location.

``cpu_score`` formula: one core compresses a fixed 64 KiB text buffer with ``zlib`` (level 6) for
a short while, timed in five slices; the fastest slice's throughput in MB/s relative to a
reference core doing 40 MB/s, times 125, is the score of one core (the fastest slice, so that a
moment when another process takes the core does not lower it); ``cpu_score = round(per_core ×
cpu_cores)``. A typical 8-core desktop scores about 1000, the figure the original HiveMind
examples use. zlib runs in C, so the score reflects the processor rather than the Python
version, and it uses no special instructions (unlike SHA or CRC) that would flatter some CPUs.
Only one core is exercised, so measuring is polite to whatever else runs on the machine.

``gpu_score``: a known model's score from :data:`GPU_SCORES` (matched by substring), else
100 per GB of GPU memory; 0 without a GPU.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
import zlib
from dataclasses import dataclass

import psutil

REFERENCE_MB_PER_S = 40.0
POINTS_PER_REFERENCE_CORE = 125
SLICES = 5  # the core is timed in this many slices and scored by the fastest
GPU_POINTS_PER_GB = 100
GPU_SCORES: dict[str, int] = {  # checked in order: more specific names first
    "H100": 6000,
    "A100": 4500,
    "4090": 2000,
    "4080": 1600,
    "3090": 1400,
    "4070": 1200,
    "3080": 1100,
    "A10": 900,
    "3070": 800,
    "T4": 500,
    "3060": 600,
}


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: int


@dataclass(frozen=True)
class Machine:
    """The capacity a node registers with."""

    cpu_cores: int
    memory_gb: int
    cpu_score: int
    gpu_name: str
    gpu_memory_gb: int
    gpu_score: int
    docker_status: str  # "enabled" | "disabled"
    location: str


def _benchmark_buffer() -> bytes:
    rnd = random.Random(1)  # fixed seed: every machine compresses the same bytes
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9))) for _ in range(500)]
    return b" ".join(rnd.choice(words) for _ in range(12000))[:65536]


def cpu_score(cores: int, seconds: float = 0.5) -> int:
    """Score ``cores`` cores by timing one of them for ``seconds`` (at most 1 s); see the module doc."""
    seconds = max(0.05, min(seconds, 1.0))
    buffer = _benchmark_buffer()
    zlib.compress(buffer, 6)  # warm: the first pass pays for the allocator and the caches
    best = 0.0
    for _ in range(SLICES):  # the best slice: what the core does when nothing else takes it
        done = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / SLICES:
            zlib.compress(buffer, 6)
            done += len(buffer)
        best = max(best, done / elapsed)
    per_core = (best / 1e6) / REFERENCE_MB_PER_S * POINTS_PER_REFERENCE_CORE
    return max(1, round(per_core * cores))


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """GPUs from ``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader`` output.

    Lines it cannot read (driver warnings, "[N/A]") are skipped.
    """
    gpus = []
    for line in text.splitlines():
        name, sep, memory = line.rpartition(",")
        parts = memory.strip().split()
        if not sep or not name.strip() or not parts:
            continue
        try:
            amount = float(parts[0])
        except ValueError:
            continue
        unit = parts[1].lower() if len(parts) > 1 else "mib"
        mib = amount * 1024 if unit.startswith("g") else amount
        gpus.append(Gpu(name=name.strip(), memory_gb=round(mib / 1024)))
    return gpus


def gpu_score(gpu: Gpu | None) -> int:
    """The score of ``gpu`` (0 for none): a known model's, else 100 per GB of memory."""
    if gpu is None:
        return 0
    upper = gpu.name.upper()
    for model, score in GPU_SCORES.items():
        if model in upper:
            return score
    return gpu.memory_gb * GPU_POINTS_PER_GB


def detect_gpus(timeout: float = 5.0) -> list[Gpu]:
    """The machine's NVIDIA GPUs; empty when ``nvidia-smi`` is absent, fails or hangs."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    try:
        done = subprocess.run(
            [binary, "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi(done.stdout) if done.returncode == 0 else []


def docker_available(timeout: float = 5.0) -> bool:
    """Whether ``docker info`` reaches an engine within ``timeout`` seconds."""
    binary = shutil.which("docker")
    if binary is None:
        return False
    try:
        done = subprocess.run([binary, "info"], capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def measure(*, location: str = "Any", use_docker: bool = True, benchmark_seconds: float = 0.5) -> Machine:
    """Measure this machine. ``use_docker=False`` reports Docker disabled without asking the engine.

    With several GPUs the best-scoring one is registered (the wire contract has room for one).
    """
    cores = psutil.cpu_count(logical=True) or 1
    gpus = detect_gpus()
    gpu = max(gpus, key=gpu_score) if gpus else None
    docker = use_docker and docker_available()
    return Machine(
        cpu_cores=cores,
        memory_gb=int(psutil.virtual_memory().total // 2**30),
        cpu_score=cpu_score(cores, benchmark_seconds),
        gpu_name=gpu.name if gpu else "",
        gpu_memory_gb=gpu.memory_gb if gpu else 0,
        gpu_score=gpu_score(gpu),
        docker_status="enabled" if docker else "disabled",
        location=location or "Any",
    )
