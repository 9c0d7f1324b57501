"""The `mendctl` program's entry point: a Ctrl-C while the command line's modules load exits 130 too,
with one line and no traceback (cli.py handles every later one)."""
import sys


def main() -> None:
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: nothing was finished; run the command again\n")
        sys.exit(130)
    run()
