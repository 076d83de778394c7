"""The raw baselines: a bare grpcio server with the pool's server options that answers at once.

ReportStatus returns success without looking at anything; UploadTask receives the bytes and
returns; UploadTaskStream receives every piece and returns. Run: ``python -m bench.echo_server PORT``.
"""

from __future__ import annotations

import signal
import sys
import threading
from concurrent import futures

import grpc

from api.server import server_options
from pool.settings import Settings
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc


class Echo(pb_grpc.NodeManagerServiceServicer, pb_grpc.MasterNodeServiceServicer):
    def HealthCheck(self, request, context):  # type: ignore[no-untyped-def]
        return pb.HealthCheckResponse(healthy=True, message="echo")

    def ReportStatus(self, request, context):  # type: ignore[no-untyped-def]
        return pb.StatusResponse(success=True, message="ok")

    def UploadTask(self, request, context):  # type: ignore[no-untyped-def]
        return pb.UploadTaskResponse(success=True, message=f"{len(request.task_zip)} bytes")

    def UploadTaskStream(self, request_iterator, context):  # type: ignore[no-untyped-def]
        size = sum(len(request.task_zip) for request in request_iterator)
        return pb.UploadTaskResponse(success=True, message=f"{size} bytes")


def main() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.GRPC_MAX_WORKERS), options=server_options(settings)
    )
    echo = Echo()
    pb_grpc.add_NodeManagerServiceServicer_to_server(echo, server)
    pb_grpc.add_MasterNodeServiceServicer_to_server(echo, server)
    server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(0)


if __name__ == "__main__":
    main()
