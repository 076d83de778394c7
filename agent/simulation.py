"""Serving a simulated fleet (``hivemind-agent simulate``): one server, the fleet, remembered tokens.

Logging in 10,000 accounts costs the pool 10,000 password checks, so the fleet remembers its
nodes' tokens in a file (mode 0600: they are credentials) and a restarted fleet only
registers its nodes again; a token the pool no longer accepts is replaced by a fresh login.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import grpc

from agent import verify
from agent.fleet import Fleet, FleetSpec, heartbeat_interval, open_channels
from agent.server import WorkerNodeServicer, create_server
from agent.session import CALL_TIMEOUT, bearer
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc

log = logging.getLogger("agent.simulation")


def read_tokens(path: Path | None) -> dict[str, str]:
    """The tokens kept at ``path`` ({} when there is no readable file)."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def write_tokens(path: Path | None, tokens: dict[str, str]) -> None:
    """Keep ``tokens`` at ``path``, readable by this user only; a failure is logged, not raised."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(tokens, handle)
        temporary.replace(path)
    except OSError as error:
        log.warning("could not keep the fleet's tokens in %s: %s", path, error)


def pool_verifier(channel: grpc.Channel, key_file: Path | None, fleet: Fleet) -> verify.CallVerifier:
    """The verifier of the pool's calls, from ``key_file`` or from the pool (waiting for it up to
    CALL_TIMEOUT), asked for with a token of ``fleet``'s first node (a new one if the pool refuses
    the one it remembers)."""
    if key_file is not None:
        return verify.CallVerifier(verify.read_key_file(key_file))
    try:
        grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT)
    except grpc.FutureTimeoutError:
        raise RuntimeError(f"the pool did not answer within {CALL_TIMEOUT:g} s") from None
    fetch = pb_grpc.NodeManagerServiceStub(channel).GetPoolPublicKey
    try:
        reply = fetch(pb.PoolPublicKeyRequest(), metadata=bearer(fleet.first_token()), timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise
        reply = fetch(pb.PoolPublicKeyRequest(), metadata=bearer(fleet.first_token(fresh=True)), timeout=CALL_TIMEOUT)
    return verify.CallVerifier(verify.load_public_key(reply.public_key_pem))


def serve_fleet(
    pool: str,
    spec: FleetSpec,
    stopping: threading.Event,
    *,
    bind: str = "0.0.0.0",
    pool_key_file: Path | None = None,
    ca_cert: Path | None = None,
    token_file: Path | None = None,
    progress: Callable[[str], None] = print,
    progress_seconds: float = 5.0,
) -> None:
    """Serve ``spec.count`` virtual nodes until ``stopping`` is set, printing progress lines.

    Raises grpc.RpcError when the pool fails the request for its key, RuntimeError when it does
    not answer or the port cannot be bound, OSError / ValueError for an unreadable or wrong key file.
    """
    channels = open_channels(pool, spec.connections, ca_cert=ca_cert)
    fleet: Fleet | None = None
    server: grpc.Server | None = None
    try:
        fleet = Fleet(channels, spec, target=pool, ca_cert=ca_cert)
        fleet.remember(read_tokens(token_file))
        verifier = pool_verifier(channels[0], pool_key_file, fleet)
        server, port = create_server(WorkerNodeServicer(verifier, fleet), f"{bind}:{spec.port}", max_workers=16)
        server.start()
        fleet.start(port)
        progress(
            f"simulating {spec.count} nodes ({spec.prefix}00000…) on port {port}, "
            f"a heartbeat per node every {heartbeat_interval(spec):g} s"
        )
        while not stopping.wait(progress_seconds):
            online, failed = fleet.online(), fleet.failed()
            progress(f"online {online}/{spec.count}, failed {failed}, tasks completed {fleet.completed}")
    finally:
        if server is not None:
            server.stop(grace=2).wait()
        if fleet is not None:
            fleet.close()
            write_tokens(token_file, fleet.tokens())
        for channel in channels:
            channel.close()
