"""python tests/kill_mid_write.py NAME N -- MAIN_ARGS: run main.py, and SIGKILL this process
halfway through the Nth write of a file whose name starts with NAME.

The hook replaces the `open` of hw2.files, through which every file is written: the Nth
file opened for writing or appending whose name is NAME (or a temporary of it) gets half its bytes,
flushed and fsynced so they are really on disk, and then the process dies. No sleep, no
race: the kill lands inside that write, every time."""
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hw2.files as files  # noqa: E402


class HalfThenDie:
    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        os.fsync(self.f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def main():
    name, nth, args = sys.argv[1], int(sys.argv[2]), sys.argv[4:]
    seen = 0

    def open_and_maybe_die(path, mode="r", *rest, **kwargs):
        nonlocal seen
        f = open(path, mode, *rest, **kwargs)
        base = Path(path).name
        if ("w" in mode or "a" in mode) and (base.startswith(name) or base.startswith(f".{name}")):
            seen += 1
            if seen == nth:
                return HalfThenDie(f)
        return f

    files.open = open_and_maybe_die  # the name write_atomic looks up before the builtin
    import main as cli

    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
