"""A pool that speaks TLS (GRPC_TLS_CERT and GRPC_TLS_KEY, SPEC §3), and everything that talks to
it: the `hivemind` command (``--ca-cert``), the worker agent (``hivemind-agent run --ca-cert``),
whose task then runs end to end, and the simulated fleet. A plain-text client is not answered."""

from __future__ import annotations

import datetime
import ipaddress
import json
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner, Result

from agent.fleet import FleetSpec
from agent.simulation import serve_fleet
from cli.main import app
from models import nodes
from orchestration.credit import set_credit
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc
from tests.agent_fixtures import work_dir  # noqa: F401  (fixture)
from tests.harness import PoolHarness, unique_name
from tests.recording_pool import wait_until
from tests.tasks_support import FAST, upload, wait_status
from tests.test_agent_end_to_end import MAIN, start_agent, stop_agent, zipped

PASSWORD = "correct-horse-battery"


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, its own CA, and its key: (cert, key) PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hivemind test pool")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "pool-cert.pem", folder / "pool-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture
def tls_pool(make_pool, sqlite_url: str, tmp_path: Path) -> tuple[PoolHarness, Path]:  # type: ignore[no-untyped-def]
    cert, key = self_signed(tmp_path)
    pool = make_pool(
        database_url=sqlite_url,
        GRPC_TLS_CERT=str(cert),
        GRPC_TLS_KEY=str(key),
        **{**FAST, "DISPATCH_TIMEOUT": 20.0, "NODE_HEARTBEAT_TIMEOUT": 60.0},
    )
    return pool, cert


def hivemind(pool: PoolHarness, home: Path, *args: str, ca_cert: Path | None) -> Result:
    """The `hivemind` command against ``pool``, its login kept under ``home``."""
    env = {"XDG_CONFIG_HOME": str(home), "HIVEMIND_POOL": pool.address, "HIVEMIND_CA_CERT": None}
    tls = ["--ca-cert", str(ca_cert)] if ca_cert else []
    return CliRunner().invoke(app, [*tls, "--timeout", "10", "--json", *args], env=env)


def test_a_tls_pool_answers_the_hivemind_command_with_its_ca_and_no_plain_client(
    tls_pool: tuple[PoolHarness, Path], tmp_path: Path
) -> None:
    pool, cert = tls_pool
    plain = grpc.insecure_channel(pool.address)
    with pytest.raises(grpc.RpcError) as refused:
        pb_grpc.NodeManagerServiceStub(plain).HealthCheck(pb.HealthCheckRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    plain.close()

    name = unique_name("tls")
    registered = hivemind(pool, tmp_path, "register", name, "--password", PASSWORD, ca_cert=cert)
    assert registered.exit_code == 0, registered.output
    assert hivemind(pool, tmp_path, "login", name, "--password", PASSWORD, ca_cert=cert).exit_code == 0
    balance = hivemind(pool, tmp_path, "balance", ca_cert=cert)
    assert balance.exit_code == 0, balance.output
    assert json.loads(balance.stdout)["balance"] == pool.settings.INITIAL_BALANCE
    # Without the CA the same command cannot reach it, and says so.
    unreached = hivemind(pool, tmp_path, "balance", ca_cert=None)
    assert unreached.exit_code == 3 and "cannot reach the pool" in unreached.output, unreached.output


def test_the_agent_joins_a_tls_pool_and_runs_its_task(  # type: ignore[no-untyped-def]
    tls_pool: tuple[PoolHarness, Path],
    celery_worker_for,
    in_background,
    unused_port: int,
    tmp_path: Path,
    work_dir: Path,  # noqa: F811
) -> None:
    pool, cert = tls_pool
    celery_worker_for(pool)
    owner, _ = pool.new_user()
    log_path = tmp_path / "agent.log"
    agent = start_agent(pool.address, owner, unused_port, work_dir, log_path, "--ca-cert", str(cert))
    try:
        submitter, token = pool.new_user()
        set_credit(pool.ctx.db, pool.settings, submitter, 100, "test submitter")  # the node is low tier
        task_id = upload(pool, token, task_zip=zipped({"main.py": MAIN, "input.txt": "6 7"}))
        done = wait_status(pool, token, task_id, {"COMPLETED", "FAILED"}, timeout=90)
        assert done.status == "COMPLETED", (done.message, log_path.read_text()[-3000:])
    finally:
        stop_agent(agent, in_background)


@pytest.mark.parametrize("heartbeat_process", [False, True], ids=["in its process", "from their own process"])
def test_the_simulated_fleet_joins_a_tls_pool_and_beats(
    tls_pool: tuple[PoolHarness, Path], heartbeat_process: bool
) -> None:
    pool, cert = tls_pool
    prefix = unique_name("f")
    spec = FleetSpec(prefix=prefix, count=3, connections=2, heartbeat_seconds=0.3, heartbeat_process=heartbeat_process)
    stopping = threading.Event()
    lines: list[str] = []
    fleet = threading.Thread(
        target=serve_fleet,
        args=(pool.address, spec, stopping),
        kwargs={"ca_cert": cert, "progress": lines.append, "progress_seconds": 0.2},
        daemon=True,
    )
    fleet.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with pool.ctx.db.reading() as session:
                online = [r for r in nodes.list_all(session) if r.node_id.startswith(prefix) and r.status == "online"]
            if len(online) == 3:
                break
            time.sleep(0.1)
        assert len(online) == 3, lines[-3:]
        registered = time.time()
        ids = [r.node_id for r in online]

        def beaten() -> bool:  # every node, since it came online, over its own TLS connection
            seen = pool.ctx.heartbeats.last_seen(ids)
            return len(seen) == 3 and min(seen.values()) > registered + 0.5

        assert wait_until(beaten, timeout=10)
    finally:
        stopping.set()
        fleet.join(timeout=20)
    assert not fleet.is_alive()
