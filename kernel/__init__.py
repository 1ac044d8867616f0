"""kernel: the mechanisms of Astra: supervisor, workers, control block, code shipping.

Imports go down only: ``kernel`` may import ``ipc`` and ``sandbox``, never ``astra``.

Processes and rings (the data path is shared memory only; pipes carry nothing but
wake-ups and pidfds carry nothing but exits):

    client c<slot>  --RunTask/CancelRun-->  to_wNN.<gen>  --> astra-wNN (one per core)
    client c<slot>  <--TaskDone/TaskError-- to_c<slot>   <-- astra-wNN
    supervisor      --StopWorker--> to_wNN.<gen>;  --WorkerLost--> to_c<slot>

Principles:

1. *Idle costs nothing.* Workers and client receivers block on ring semaphores; the
   supervisor blocks in ``poll`` on worker pidfds and a signal wake pipe, waking once per
   ``TICK_S`` to reclaim dead clients.
2. *Nothing hangs, nothing is lost silently.* A task's future completes with its result,
   its exception, ``WorkerCrashedError`` (its worker died more often than its retries
   allow), or ``KernelNotRunningError`` (the kernel went away). Clients learn of a dead
   worker from the supervisor's ``WorkerLost`` and, should that notice be lost, from the
   worker's generation in the control block.
3. *Mechanism, not policy.* Placement (least loaded of two), retries and dependency edges
   are the client's; the kernel runs what it is given.

Open questions:

- XX: a client that lives but stops reading its ring (SIGSTOP, a wedged receiver) blocks
  the workers replying to it once its ring fills; per-client flow control is not built.
- XX: placement is the client's (least loaded of two, same-core on a tie); the work-stealing
  scheduler of the DAG issue replaces it, and moves dependency edges into the kernel.
- XX: ``timeout_s`` interrupts a plain task with ``SIGALRM``; C code that never returns to
  the interpreter runs on. Killing and restarting the worker would be the hard limit.

Numbered protocols live in the module docstrings: start, restart and stop in
``supervisor.py``; receive, run, reply and stop in ``worker.py``; registration in
``control.py``; the single-instance lock and state file in ``daemon.py``.
"""

from __future__ import annotations

from . import shipping
from .config import (
    DEFAULT_CONFIG_PATH,
    RELOADABLE,
    Config,
    ConfigError,
    config_keys,
    format_config,
    load_config,
)
from .control import ClientRow, ControlBlock, KernelState, WorkerRow
from .daemon import DaemonState, default_state_dir, list_states, read_state, run_daemon
from .errors import InstanceExistsError, KernelError, RegistrationError, TaskTimeout
from .kmetrics import KERNEL_METRICS, collect_kernel_metrics, render_kernel_metrics
from .logs import configure_logging, log_event
from .messages import (
    AgentCall,
    AgentReplies,
    AgentReply,
    CancelRun,
    ErrorKind,
    RunTask,
    StealReply,
    StopWorker,
    TaskDone,
    TaskError,
    TasksMoved,
    Wake,
    WorkerLost,
    decode_frames,
    encode,
    encode_queue,
)
from .metrics import MetricSpec, MetricsRow, MetricsServer, MetricsTable, render_prometheus
from .notify import Notifier
from .shipping import ShippingError, function_key
from .supervisor import (
    EXIT_OK,
    EXIT_RESTART_INTENSITY,
    RestartPolicy,
    Supervisor,
    fork_supervisor,
    worker_ring,
)
from .worker import cancel_requested

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "EXIT_OK",
    "EXIT_RESTART_INTENSITY",
    "KERNEL_METRICS",
    "RELOADABLE",
    "AgentCall",
    "AgentReplies",
    "AgentReply",
    "CancelRun",
    "ClientRow",
    "Config",
    "ConfigError",
    "ControlBlock",
    "DaemonState",
    "ErrorKind",
    "InstanceExistsError",
    "KernelError",
    "KernelState",
    "MetricSpec",
    "MetricsRow",
    "MetricsServer",
    "MetricsTable",
    "Notifier",
    "RegistrationError",
    "RestartPolicy",
    "RunTask",
    "ShippingError",
    "StealReply",
    "StopWorker",
    "Supervisor",
    "TaskDone",
    "TaskError",
    "TaskTimeout",
    "TasksMoved",
    "Wake",
    "WorkerLost",
    "WorkerRow",
    "cancel_requested",
    "collect_kernel_metrics",
    "config_keys",
    "configure_logging",
    "decode_frames",
    "default_state_dir",
    "encode",
    "encode_queue",
    "fork_supervisor",
    "format_config",
    "function_key",
    "list_states",
    "load_config",
    "log_event",
    "read_state",
    "render_kernel_metrics",
    "render_prometheus",
    "run_daemon",
    "shipping",
    "worker_ring",
]
