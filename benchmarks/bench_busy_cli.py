"""How long ``convnorm-fx inspect`` takes on a busy machine, by OpenMP wait policy.

Starts ``--hogs`` CPU-bound processes (pure Python loops), then runs the README's main job,
``convnorm-fx inspect``, in a fresh process once per wait policy:

* ``cli default``: ``OMP_WAIT_POLICY`` not set, so the command sets ``PASSIVE`` for itself;
* ``openmp default``: ``OMP_WAIT_POLICY`` set to an empty value, which the command leaves alone
  and OpenMP ignores: its own default (spin, then sleep), which is what the command did before
  it chose a policy;
* ``active``: ``OMP_WAIT_POLICY=ACTIVE`` (spin).

Each run is time-limited (``--timeout``); a run that does not finish is recorded as such.

Usage::

    python benchmarks/bench_busy_cli.py --hogs 2 --timeout 600
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
POLICIES = {"cli default": None, "openmp default": "", "active": "ACTIVE"}


def _run_inspect(policy: str | None, timeout: float, extra: list[str]) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    command = [sys.executable, "-m", "convnorm_fx", "inspect", *extra]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"finished": False, "wall_s": None, "limit_s": timeout}
    wall = time.perf_counter() - start
    return {"finished": True, "wall_s": round(wall, 1), "exit_status": result.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hogs", type=int, default=2, help="CPU-bound processes running beside (default 2)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a run is stopped")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of: " + ", ".join(POLICIES))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "busy_cli.json")
    args, extra = parser.parse_known_args()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    records = []
    try:
        time.sleep(1.0)
        for name in args.policies.split(","):
            record = {"policy": name, "OMP_WAIT_POLICY": POLICIES[name], **_run_inspect(POLICIES[name], args.timeout, extra)}
            print(record, flush=True)
            records.append(record)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    payload = {
        "command": "python benchmarks/bench_busy_cli.py " + " ".join(sys.argv[1:]),
        "hogs": args.hogs,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
