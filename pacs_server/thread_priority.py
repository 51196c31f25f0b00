"""Lower the CPU priority of the calling thread: background work yields to ingest.

The job runners (routing, sends, webhooks) run in the server's main process while the DICOM
workers ingest. Sending an instance again costs about as much CPU as receiving it, and on a
machine whose cores are busy with ingest a runner at the same priority slows every C-STORE
(docs/benchmarks.md, "Routing"). At a lower priority the runners use what the ingest leaves.

- Linux: ``setpriority`` on the thread's own ID; Linux schedules threads as tasks, so the nice
  value is the thread's alone.
- macOS has no per-thread nice value. A thread's quality-of-service class sets its CPU priority
  there: ``pthread_set_qos_class_self_np(QOS_CLASS_UTILITY)`` ("long-running work the user does
  not wait for", below the default class of the rest of the server). This call is not exercised on
  the project's Linux CI.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

QOS_CLASS_UTILITY = 0x11  # <sys/qos.h>


def lower_current_thread(nice: int) -> None:
    """Give the calling thread ``nice`` (1–19) below the process's priority; 0 leaves it as it is.

    A failure is logged, never raised: the thread then runs at the normal priority."""
    if nice <= 0:
        return
    try:
        if sys.platform == "darwin":
            # It returns the error number itself (0 on success), not -1 and errno.
            error = ctypes.CDLL(None).pthread_set_qos_class_self_np(QOS_CLASS_UTILITY, 0)
            if error:
                raise OSError(error, f"pthread_set_qos_class_self_np: {os.strerror(error)}")
        elif sys.platform.startswith("linux"):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        else:
            log.info(
                "thread %s keeps the normal CPU priority: not supported on %s",
                threading.current_thread().name,
                sys.platform,
            )
    except (OSError, AttributeError) as exc:
        log.warning("thread %s keeps the normal CPU priority: %s", threading.current_thread().name, exc)
