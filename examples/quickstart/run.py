"""The quickstart: start a worker in a subprocess, call tasks from here, print what happens, stop it.

    python examples/quickstart/run.py

It is what you would do by hand in two terminals:

    python -m aqueue -A tasks worker --loglevel=info       # terminal 1 (in this folder)
    python -c "import asyncio, tasks; print(asyncio.run(tasks.add.delay(4, 4).get()))"   # terminal 2
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.chdir(HERE)

from tasks import add, app, divide  # noqa: E402


async def main() -> int:
    print("$ python -m aqueue -A tasks worker --loglevel=info")
    worker = subprocess.Popen([sys.executable, "-m", "aqueue", "-A", "tasks", "worker", "--loglevel=info"])
    try:
        async with app:
            result = add.delay(4, 4)
            print(f">>> result = add.delay(4, 4)      # {result!r}")
            print(f">>> await result.get(timeout=30)  # {await result.get(timeout=30)}")
            print(f">>> await result.ready()          # {await result.ready()}")
            print(f">>> result.state                  # {result.state}")
            failing = divide.delay(1, 0)
            try:
                await failing.get(timeout=30)
            except ZeroDivisionError as exc:
                print(f">>> await divide.delay(1, 0).get()  # raised {exc!r}")
                print(f">>> failing.state                 # {failing.state}")
                print(">>> print(failing.traceback)      # the worker's traceback:")
                print(failing.traceback)
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=30)
    print(f"worker stopped with exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
