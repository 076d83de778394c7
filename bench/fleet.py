"""The pipeline benchmark's fleet: ``hivemind-agent simulate``'s Fleet, noting when each task arrives.

Run: ``python -m bench.fleet POOL COUNT PREFIX TOKENS STATE``. The nodes' tokens come from the
JSON file TOKENS (the accounts were created in bulk; each node still registers over gRPC).
Every half second the fleet writes STATE (JSON): nodes online and failed, tasks received and
completed, and how its heartbeats kept up (the longest ReportStatus, the furthest a sweep fell
behind its schedule, in seconds, and the heartbeats lost, by status code); on SIGUSR1 it also
writes the arrival time of every task (``time.monotonic()``, which on Linux is one clock for
every process of the machine) to ``STATE.arrivals``.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import grpc

from agent.fleet import Fleet, FleetSpec, open_channels
from agent.server import WorkerNodeServicer, create_server, settle
from agent.simulation import pool_verifier
from agent.verify import PoolClaims
from protos import nodepool_pb2 as pb

CONNECTIONS = 8  # the nodes' calls spread over this many connections, as many machines' would be


class RecordingFleet(Fleet):
    def __init__(self, channels: list[grpc.Channel], spec: FleetSpec, *, target: str) -> None:
        super().__init__(channels, spec, target=target)
        self.arrivals: dict[str, float] = {}

    def execute(self, claims: PoolClaims, request: pb.ExecuteTaskRequest) -> tuple[bool, str]:
        self.arrivals.setdefault(claims.task_id, time.monotonic())
        return super().execute(claims, request)


def write_json(path: Path, data: object) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data))
    temporary.replace(path)


def main() -> None:
    pool, count, prefix, tokens_file, state_file = sys.argv[1:6]
    settle()  # as hivemind-agent simulate does
    state = Path(state_file)
    spec = FleetSpec(
        prefix=prefix,
        count=int(count),
        create_accounts=False,
        login_workers=8,
        connections=CONNECTIONS,
        heartbeat_process=True,  # kept on time however busy the tasks keep this process
    )
    channels = open_channels(pool, spec.connections)
    fleet = RecordingFleet(channels, spec, target=pool)
    fleet.remember(json.loads(Path(tokens_file).read_text()))
    servicer = WorkerNodeServicer(pool_verifier(channels[0], None, fleet), fleet)
    server, port = create_server(servicer, "127.0.0.1:0", max_workers=16)
    server.start()
    fleet.start(port)
    stopping = threading.Event()
    dump = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGUSR1, lambda *_: dump.set())
    while not stopping.wait(0.5):
        if dump.is_set():
            dump.clear()
            write_json(state.with_suffix(".arrivals"), dict(fleet.arrivals))
        write_json(
            state,
            {
                "online": fleet.online(),
                "failed": fleet.failed(),
                "received": len(fleet.arrivals),
                "completed": fleet.completed,
                **fleet.heartbeats.record(),  # sweep_lag, beat_wait, beats_failed
            },
        )
    server.stop(grace=1).wait()
    fleet.close()
    for channel in channels:
        channel.close()


if __name__ == "__main__":
    main()
