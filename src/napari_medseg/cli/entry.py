"""``medseg``'s entry: parse, run one verb, and turn its errors into messages and exit statuses."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time

from ..errors import MedsegError
from .interrupts import Terminated, on_sigterm
from .parser import build_parser


def _os_error_message(exc: OSError) -> str:
    """The file an operating-system error is about, then why."""
    if exc.filename is None:
        return str(exc)
    files = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    return f"{files}: {exc.strerror or exc}"


# options whose value is comma-separated numbers, the first of which may be negative: argparse
# takes '-10,0,100,100' for an option of its own ('--region: expected one argument')
NUMBER_LIST_OPTIONS = ("--region", "--class-weights")
NEGATIVE_NUMBER = re.compile(r"-\.?\d")


def _negative_values_joined(argv: list[str]) -> list[str]:
    """``--region -10,0,100,100`` as ``--region=-10,0,100,100``, which argparse reads as its value
    (then said inside or outside the slide like any region); nothing after ``--`` is touched."""
    words, i = list(argv), 0
    while i < len(words) - 1 and words[i] != "--":
        if words[i] in NUMBER_LIST_OPTIONS and NEGATIVE_NUMBER.match(words[i + 1]):
            words[i:i + 2] = [f"{words[i]}={words[i + 1]}"]
        i += 1
    return words


def main(argv: list[str] | None = None) -> int:
    """Runs one ``medseg`` command; returns its exit status. A ``MedsegError`` (a problem the user can
    fix) or an ``OSError`` is printed as one line; anything else is a bug and keeps its traceback.
    Ctrl-C and SIGTERM end it cleanly: no temp file is left behind, nothing half-written is visible."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a hub download
    try:
        args = build_parser().parse_args(_negative_values_joined(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help, or a bad argument: argparse has printed why
        return exc.code
    # only where no one else handles SIGTERM (signals can be set in the main thread only)
    handle = (threading.current_thread() is threading.main_thread()
              and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None))
    if handle:
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return _run(args)
    finally:
        if handle:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


LINGER_S = 10.0  # how long a torchrun rank waits for the first to say an error they share (``_said_late``)


def _said_by_another_rank() -> bool:
    """Under torchrun, whether this process's error is said by another: each of a node's processes
    meets the same error in the setup (the same config, files and options: 'epochs must be an
    integer' had been printed once per process), so its first process (LOCAL_RANK 0) says it.
    Once the processes have joined their group, an error may be this process's own: said by each."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        return False
    dist = sys.modules.get("torch.distributed")
    return not (dist is not None and dist.is_available() and dist.is_initialized())


def _rank_words() -> str:
    """' (rank N)' where a process other than torchrun's first says an error."""
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f" (rank {rank})"


def _said_late(code: int, message: str) -> int:
    """A rank whose error another should say: pauses, so that torchrun (which ends the others once
    one process exits) does not end the one that says it before it has; ended in the pause, it
    exits quietly with the same status. Still running after it, the first process has not met
    this error (a process of its own, e.g. a file only this one cannot read): it says it then."""
    try:
        time.sleep(LINGER_S)
    except KeyboardInterrupt:  # torchrun's SIGTERM (``Terminated``) once the first has exited: said there
        return code
    print(message, file=sys.stderr)
    return code


def _run(args) -> int:
    """``args.func(args)``, its errors as messages and exit statuses (see ``main``)."""
    try:
        return args.func(args)
    except MedsegError as exc:
        return _say_error(args, str(exc))
    except BrokenPipeError:  # the reader went (``medseg info default | head``): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail too
        return 141  # as a process ended by SIGPIPE
    except OSError as exc:
        return _say_error(args, _os_error_message(exc))
    except Terminated:
        print(f"medseg {args.command}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"medseg {args.command}: interrupted", file=sys.stderr)
        return 130


def _say_error(args, what: str) -> int:
    """A user's error as one line on stderr, exit status 2; under torchrun said once, by the
    process whose turn it is (``_said_by_another_rank``)."""
    message = f"medseg {args.command}{_rank_words()}: error: {what}"
    if _said_by_another_rank():
        return _said_late(2, message)
    print(message, file=sys.stderr)
    return 2
