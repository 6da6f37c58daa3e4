"""Leave a complete checkpoint when the job is told to end (issue 16, item 1).

SLURM preemption and job-time limits send SIGTERM (``--signal`` can make it earlier), Ctrl-C
sends SIGINT; ``--exit-duration-in-mins`` ends a run before its wall-clock allocation does.
The handler only sets a flag (Megatron's ``--exit-signal-handler`` does the same,
megatron/training/dist_signal_handler.py): at the next update boundary every rank contributes
its flag to one all-reduce (MAX), so all ranks agree to stop after the same update, save one
complete checkpoint and exit 0 with a message. A second SIGINT ends the process at once (the
default handler is restored after the first).
"""

from __future__ import annotations

import signal
import time

import torch.distributed as dist

from megatron_apt.parallel.state import comm_tensor

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ExitGuard:
    def __init__(self, handle_signals: bool = True, duration_mins: float | None = None):
        self.received: int | None = None
        self.start = time.monotonic()
        self.duration_s = None if duration_mins is None else 60.0 * duration_mins
        self._previous: dict = {}
        if handle_signals:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.received = signum
        if signum == signal.SIGINT:  # a second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def should_exit(self) -> str | None:
        """Collective (one small all-reduce): why every rank stops now, or None."""
        timed_out = self.duration_s is not None and time.monotonic() - self.start >= self.duration_s
        flags = comm_tensor([1.0 if self.received is not None else 0.0, float(timed_out)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signalled, out_of_time = flags.tolist()
        if signalled:
            name = signal.Signals(self.received).name if self.received else "a signal"
            return f"{name} received" if self.received else f"{name} received on another rank"
        if out_of_time:
            return f"--exit-duration-in-mins {self.duration_s / 60:g} reached"
        return None
