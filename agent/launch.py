"""The launcher: confine this process, then become the task's command (``exec``).

The agent starts every task command through this script, run by the agent's own interpreter
(``python -I -S launch.py CONFIG -- ARGV…``), instead of using ``preexec_fn`` or
``Popen(user=…)``: both make Python ``fork()`` the agent, a multi-threaded gRPC process, and
code that runs in such a child between ``fork`` and ``exec`` (Python's, or gRPC's own fork
handlers) can crash or deadlock. Without them ``subprocess`` uses ``vfork``/``exec``, and all
confinement happens here, in a fresh single-threaded process, in this order:

1. drop privileges (when CONFIG names a uid): clear supplementary groups, set gid, set uid;
2. ask to be killed when the agent thread that started it dies (``PR_SET_PDEATHSIG``, set
   after the uid change, which would clear it), and quit if the agent is already gone;
3. lower the priority (``nice``), set the umask and the rlimits;
4. ``execvp`` the command with the environment the agent gave it.

CONFIG is JSON: ``{"uid", "gid", "parent", "nice", "umask", "rlimits": {"RLIMIT_AS": [soft, hard], …}}``.
It imports only the standard library: it runs before ``site`` (``-S``), outside the project.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import warnings  # noqa: F401  os.execvp imports it lazily; after the uid change the stdlib may be unreadable

PR_SET_PDEATHSIG = 1


def main(args: list[str]) -> None:
    if len(args) < 3 or args[1] != "--":
        sys.stderr.write("usage: launch.py CONFIG -- COMMAND [ARG...]\n")
        os._exit(126)
    config = json.loads(args[0])
    argv = args[2:]
    if config.get("uid") is not None:
        os.setgroups([])
        os.setgid(config["gid"])
        os.setuid(config["uid"])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if config.get("parent") and os.getppid() != config["parent"]:
        os._exit(125)  # the agent died before the signal was armed
    os.nice(config.get("nice", 0))
    os.umask(config.get("umask", 0o022))
    for name, (soft, hard) in config.get("rlimits", {}).items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    try:
        os.execvp(argv[0], argv)
    except OSError as error:
        sys.stderr.write(f"cannot run {argv[0]}: {error.strerror}\n")
        os._exit(127)


if __name__ == "__main__":
    main(sys.argv[1:])
