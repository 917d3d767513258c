"""`dpokit-torchrun` (or `python -m dpokit.cli.torchrun`): torchrun, ending a stopped run the way a
single process does.

Plain `torchrun` treats a stop signal as a crash: on SIGTERM or SIGINT it forwards the signal
to the workers, waits for them (dpokit's workers finish the step, save a checkpoint and rank 0
prints the resume line), then raises and exits 1 with its own traceback. This launcher takes
the same options as torchrun and runs torchrun's own code; it only turns that ending into the
exit status a single process gives (128 + the signal: 143 for SIGTERM, 130 for SIGINT), quietly.
Every other failure is reported by torchrun as usual.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

# What a worker stopped by a signal exits with: dpokit's 128 + signal after saving, or the
# negative signal number when it was killed outright.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _stopped_by_signal(exit_code: int) -> bool:
    return any(exit_code in (128 + int(sig), -int(sig)) for sig in _STOP_SIGNALS)


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(argv) if argv is not None else None)
    try:
        run(args)
    except SignalException as exc:  # the launcher itself got the signal and stopped the workers
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:  # a signal reached the workers only
        codes = [failure.exitcode for failure in exc.failures.values()]
        if codes and all(_stopped_by_signal(code) for code in codes):
            return 128 + abs(codes[0]) % 128
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
