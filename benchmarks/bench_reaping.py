"""How long a killed run's environment outlives the kill, per engine.

For each engine, start a pytest run whose test makes an environment (with a
command running in it) and blocks; SIGKILL the run; time until nothing of it
is left: folder, cgroup, processes, container, network, ledger entry.  The
watchdog does the work; Ryuk, testcontainers' reaper, waits 10 s after its
client disconnects and covers Docker only.

    python benchmarks/bench_reaping.py [--repeat N] [--image IMAGE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TEST = """
import json, os, threading, time
import pytest

@pytest.mark.isolated({marker})
def test_blocks(isolated_env):
    threading.Thread(target=isolated_env.run, args=(["sh", "-c", "sleep 300"],),
                     daemon=True).start()
    time.sleep(0.3)
    made = {{
        "root": str(getattr(isolated_env, "root", "")),
        "cgroups": [str(p) for p in getattr(getattr(isolated_env, "cgroups", None),
                                              "directories", lambda: [])()],
        "container": getattr(isolated_env, "name", ""),
    }}
    with open({state!r} + ".tmp", "w") as handle:
        json.dump(made, handle)
    os.replace({state!r} + ".tmp", {state!r})
    time.sleep(300)
"""


def markers(image: str) -> dict[str, str]:
    return {
        "basic": '"basic"',
        "virtualenv": '"virtualenv"',
        "sandbox": '"sandbox", limits={"memory": "256M"}',
        "docker": f'"docker", image={image!r}, network=True',
    }


def left(made: dict[str, Any], ledger: Path) -> list[str]:
    found = []
    if made["root"] and os.path.exists(made["root"]):
        found.append(made["root"])
    found += [p for p in made["cgroups"] if os.path.exists(p)]
    if made["container"]:
        session = made["container"].split("-")[2]
        names = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"name={made['container']}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        networks = subprocess.run(
            ["docker", "network", "ls", "-q", "--filter", f"name=pytest-isolation-{session}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        found += names + networks
    sleepers = subprocess.run(
        ["pgrep", "-x", "-f", "sleep 300"], capture_output=True, text=True, check=False
    ).stdout.split()
    found += sleepers
    if ledger.exists():
        found += [p.name for p in ledger.iterdir()]
    return found


def once(engine: str, marker: str, work: Path) -> float:
    run = work / f"{engine}-{time.monotonic_ns()}"
    run.mkdir()
    state = run / "made.json"
    (run / "test_blocking.py").write_text(TEST.format(marker=marker, state=str(state)))
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(run)],
        cwd=run,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not state.exists():
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{engine}: the environment never came up")
            time.sleep(0.02)
        made = json.loads(state.read_text())
        started = time.monotonic()
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        ledger = Path(os.environ["PYTEST_ISOLATION_STATE_DIR"]) / "ledger"
        while left(made, ledger):
            if time.monotonic() - started > 30:
                raise RuntimeError(f"{engine}: still there after 30 s: {left(made, ledger)}")
            time.sleep(0.005)
        return time.monotonic() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--image",
        default=os.environ.get("PYTEST_ISOLATION_TEST_IMAGE", "piso-test-python:bookworm"),
    )
    parser.add_argument("--engines", default="basic,virtualenv,sandbox,docker")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="piso-bench-reaping-"))
    os.environ["PYTEST_ISOLATION_STATE_DIR"] = str(work / "state")
    os.environ["PYTEST_ISOLATION_CACHE_DIR"] = str(work / "cache")
    os.environ.pop("PYTEST_ISOLATION_WATCHDOG", None)
    rows = []
    try:
        for engine in args.engines.split(","):
            times = [once(engine, markers(args.image)[engine], work) for _ in range(args.repeat)]
            rows.append((engine, times))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("time from SIGKILL of the runner until nothing of its environment is left")
    print(
        f"{'engine':<12} {'n':>3} {'min ms':>9} {'median ms':>10} {'max ms':>9}  target <= 2000 ms"
    )
    for engine, times in rows:
        ms = [t * 1000 for t in times]
        verdict = "PASS" if max(ms) <= 2000 else "FAIL"
        print(
            f"{engine:<12} {len(ms):>3} {min(ms):>9.0f} {statistics.median(ms):>10.0f} "
            f"{max(ms):>9.0f}  {verdict}"
        )
    print("(testcontainers' Ryuk: 10 s after the client disconnects, Docker only)")
    return 0 if all(max(t) <= 2 for _, t in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
