"""Entry point of the `featcache` command: imports every command module, then runs the group."""
from __future__ import annotations

import importlib

from featcache_cli.app import cli

# Each module registers its commands on `cli` when imported; a module that is absent is skipped
# so that a partial checkout still gives a working command.
_COMMAND_MODULES = ("extract_cmds", "train_cmds", "eval_cmds", "report_cmds", "medical_cmds", "scale_cmds")

for _name in _COMMAND_MODULES:
    try:
        importlib.import_module(f"featcache_cli.{_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"featcache_cli.{_name}":
            raise


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (the library's notes) as one line on stderr, like every other message,
    without the source location and code line Python's default format adds."""
    import sys

    print(f"warning: {message}", file=file or sys.stderr)


class _PipeSafeStream:
    """stdout that outlives its reader: after `featcache train ... | head -1` the pipe closes while
    the command still has a run directory to write; a broken pipe sends the rest of the output to
    /dev/null instead of aborting the command before it saves anything."""

    def __init__(self, stream):
        self._stream = stream

    def _drop(self) -> None:
        import os

        self._stream = open(os.devnull, "w")

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main() -> None:
    import signal
    import sys
    import warnings

    warnings.showwarning = _one_line_warning
    if sys.stdout is not None:  # None when started with stdout closed (>&-): nothing to protect
        sys.stdout = _PipeSafeStream(sys.stdout)
    if sys.stderr is not None:  # progress bars and warnings: `2>&1 | head` must not abort a run either
        sys.stderr = _PipeSafeStream(sys.stderr)

    # past the file-size limit (ulimit -f) the kernel would kill the process with SIGXFSZ in the
    # middle of an HDF5 write; ignored, the write fails with EFBIG and featcache says what is saved
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    cli(prog_name="featcache")


if __name__ == "__main__":
    main()
