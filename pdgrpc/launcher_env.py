"""A child of `pdgrpc up` dies with it: the launcher names itself in the environment and the child
asks the kernel for SIGTERM when its parent goes (prctl PR_SET_PDEATHSIG).

Kept apart from pdgrpc.launcher so every subcommand can call it at start without importing grpc.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1

PARENT_ENV = "PDGRPC_DIE_WITH_PARENT"


def die_with_parent_from_env() -> None:
    """In a child of `pdgrpc up`: get SIGTERM when the launcher dies, even if it is killed outright,
    so children never linger holding ports and memory. The child asks for it itself (at start, see
    cli.main) rather than in a preexec_fn: a preexec_fn makes subprocess fork instead of spawn, and a
    fork of a process with live gRPC channels can crash the child before exec (grpc issue 43055: epoll
    EBADF, SIGABRT), which once killed a coordinator at start."""
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent.isdigit():
        return
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the launcher died before we asked
        os.kill(os.getpid(), signal.SIGTERM)
