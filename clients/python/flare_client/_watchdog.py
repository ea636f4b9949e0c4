"""Ends this program's process group when its node is gone, so that no trainer outlives a
killed node: started when the package is imported in a program that a node launched
(`FLARE_CLIENT_SOCKET` set), so a program that hangs before `init()` is covered too."""

import os
import signal
import sys
import threading
import time

POLL_S = 0.5
_started = False


def _node_pid():
    try:
        return int(os.environ.get("FLARE_CLIENT_PARENT_PID", ""))
    except ValueError:
        return None


def kill_group(why):
    """SIGKILL to this program's process group (the node starts it in a group of its own).
    Never to a group the node itself belongs to: then only this process ends."""
    try:
        sys.stderr.write("flare_client: %s: ending this program's process group\n" % why)
        sys.stderr.flush()
    except Exception:
        pass
    pgrp = os.getpgrp()
    node = _node_pid()
    shared = False
    if node is not None:
        try:
            shared = os.getpgid(node) == pgrp
        except OSError:
            shared = False
    try:
        if not shared:
            os.killpg(pgrp, signal.SIGKILL)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch(node, ppid0):
    while True:
        if os.getppid() != ppid0:
            kill_group("the parent process (pid %d) is gone" % ppid0)
        if node is not None and not _alive(node):
            kill_group("the node (pid %d) is gone" % node)
        time.sleep(POLL_S)


def start():
    """Starts the watch once per process (a forked child starts its own on import of a fresh
    interpreter; fork copies no threads)."""
    global _started
    if _started or not os.environ.get("FLARE_CLIENT_SOCKET"):
        return
    _started = True
    t = threading.Thread(target=_watch, args=(_node_pid(), os.getppid()), name="flare-parent-watch", daemon=True)
    t.start()


def _after_fork():
    global _started
    _started = False
    start()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
