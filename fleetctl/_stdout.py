"""Writing fleetctl's output. A reader that left (`fleetctl status | head`) ends the output
quietly, as a reader that is done; any other failure to write (a full disk) is reported on
stderr and fails the command. Standard library only: the start-up fast path uses it."""

import os
import sys


def write(text: str | bytes) -> bool:
    """Whether `text` (and a newline) reached stdout, or the reader left."""
    try:
        if isinstance(text, bytes):
            sys.stdout.buffer.write(text + b"\n")
        else:
            try:
                sys.stdout.write(text + "\n")
            except UnicodeEncodeError:  # nothing written: an argument that was not UTF-8, echoed
                sys.stdout.write(text.encode(errors="backslashreplace").decode() + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        discard()
    except OSError as exc:
        discard()
        sys.stderr.write(f"fleetctl: cannot write the output: {exc.strerror or exc}\n")
        return False
    return True


def discard() -> None:
    """Point stdout at /dev/null, so that no later flush finds the broken pipe to report."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def printable(message: str) -> str:
    """`message` with what UTF-8 cannot encode escaped: errors echo arguments, and Python
    makes the bytes of an argument that is not UTF-8 into lone surrogates."""
    return message.encode(errors="backslashreplace").decode()
