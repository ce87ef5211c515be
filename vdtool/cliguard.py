"""How the command line reports what goes wrong, without click: one line
on stderr (``vdtool: error: MESSAGE``) and the exit status for each kind
of failure, and the stop signals that unwind instead of killing.  The click
group (vdtool.cli) and the quick path that runs ``vdtool info FILE``
without importing click (vdtool.quickcli) share it, so both report alike."""

from __future__ import annotations

import os
import signal
import sys

from vdtool.core.errors import Terminated


def one_line(text) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "(no message)"


def error(message: str) -> None:
    try:
        from vdtool.terminal import message_line

        message_line("vdtool: error:", one_line(message), "bold red")
    except Exception:
        pass


def warning(text: str) -> None:
    try:
        from vdtool.terminal import message_line

        message_line("vdtool: warning:", one_line(text), "bold yellow")
    except Exception:
        pass


def quiet_broken_pipe() -> None:
    """stdout went away (``vdtool info x | head -1``): no more output."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except Exception:
        pass


def _raise_terminated(signum, frame):
    # once is enough: a second signal must not interrupt the cleanup
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


_late_signals_hooked = False


def _ignore_late_stop_signals() -> None:
    """At exit: CPython puts the default actions back while it shuts down, so
    a SIGTERM in the last moments would kill vdtool after its work is done
    (status -15 instead of the one it has); from here on they are ignored."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (ValueError, OSError):
            pass


def install_stop_signals() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C (staging folders removed,
    locks released) instead of killing the process where it stands;
    long operations first ask to stop at their next safe point (see
    vdtool.progressbar).  A signal ignored by whoever started vdtool
    (nohup) stays ignored."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) != signal.SIG_IGN:
                signal.signal(sig, _raise_terminated)
        except (ValueError, OSError):  # not the main thread (an embedding program)
            pass
    global _late_signals_hooked
    if not _late_signals_hooked:
        import atexit

        atexit.register(_ignore_late_stop_signals)
        _late_signals_hooked = True
    # SIGUSR1 asks a long operation for a progress line (vdtool.progressbar);
    # before or between operations it must not kill vdtool (its default)
    try:
        if hasattr(signal, "SIGUSR1") and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    except (ValueError, OSError):
        pass


def _traceback(debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exc()


def exit_status(e: BaseException, debug: bool) -> int:
    """Report ``e`` (raised by a command) as one line on stderr and return
    the exit status it gives; call it inside the ``except`` clause (--debug
    prints the traceback being handled)."""
    if isinstance(e, Terminated):
        _traceback(debug)
        error(str(e))
        return e.exit_code
    if isinstance(e, KeyboardInterrupt):
        _traceback(debug)
        error("interrupted")
        return 130
    if isinstance(e, BrokenPipeError):
        # the reader of standard output went away: stop quietly, with
        # the status a process killed by SIGPIPE reports in a shell
        quiet_broken_pipe()
        return 128 + 13
    from vdtool.core.errors import VdError

    _traceback(debug)
    if isinstance(e, VdError):
        error(str(e))
        return getattr(e, "exit_code", 1)
    if isinstance(e, OSError):
        what = e.strerror or str(e)
        if e.filename is not None:
            what = f"{e.filename}: {what}"
            if e.filename2 is not None:
                what = f"{e.filename} -> {e.filename2}: {e.strerror or e}"
        error(what)
        return 1
    hint = "" if debug else " (run with --debug for the traceback)"
    error(f"internal error: {type(e).__name__}: {one_line(e)}{hint}")
    return 1
