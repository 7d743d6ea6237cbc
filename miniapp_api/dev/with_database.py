"""Run a command with a SecantusDB server of its own, named to it by MONGO_URI; the server stops when it ends.

    python -m miniapp_api.dev.with_database -- python -m pytest -q tests/test_flow.py

`make test-secantus` runs the DB-touching test files this way (README: "Which tests run against what"). The server
(portraits/store/db_server.py: `secantusd-py` as a separate process, never imported) keeps its data in a temporary
directory, removed afterwards, unless --instance-dir names one. Exits with the command's status.
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from portraits.store import db_server


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instance-dir", type=Path, help="where the server keeps its data (default: a temporary "
                                                          "directory, removed afterwards)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after `--`")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after `--`)")
    instance_dir = args.instance_dir
    if instance_dir is None:
        instance_dir = Path(tempfile.mkdtemp(prefix="secantus-"))
        # registered before join's own exit hook, so it runs after it (atexit runs the last registered first)
        atexit.register(shutil.rmtree, instance_dir, ignore_errors=True)
    uri = db_server.join(instance_dir)
    print(f"SecantusDB server at {uri} (log: {db_server.server_files(instance_dir).log})", flush=True)
    try:
        returncode = subprocess.call(command, env={**os.environ, "MONGO_URI": uri})
    except KeyboardInterrupt:  # the command had the Ctrl-C too
        returncode = 130
    finally:
        db_server.stop(instance_dir)
    sys.exit(returncode)


if __name__ == "__main__":
    main()
