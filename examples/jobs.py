"""A small resumable job runner for the experiment plans (``reproduce_small.py``, ``reproduce_table6.py``).

A plan is a list of :class:`Job` s. :func:`run_jobs` starts them ``jobs`` at a time in the
order given (a job waits for the jobs named in its ``after``), skips every job whose
``done_file`` already exists, so an interrupted plan resumes where it stopped, logs each job
to ``RUNS/logs/NAME.log`` and records the command, wall time and exit status of each job in
``RUNS/jobs.json``. A job can name small result files to copy once it has finished
(``Job.keep``), so that the JSON outputs can be committed while checkpoints stay behind.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Job", "run_jobs"]


@dataclass
class Job:
    """One command of a plan."""

    name: str
    argv: list[str]
    done_file: Path  # exists when the job has finished
    after: list[str] = field(default_factory=list)  # names of jobs that must finish first
    keep: list[tuple[Path, Path]] = field(default_factory=list)  # (source, destination) copied when done


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _copy_kept(job: Job) -> None:
    for source, destination in job.keep:
        if source.is_file():
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)


def run_jobs(jobs: list[Job], runs: Path, *, parallel: int, threads: int, cwd: Path) -> set[str]:
    """Run the unfinished jobs of a plan; returns the names of the jobs that failed.

    Args:
        jobs: the plan, in order of priority.
        runs: directory of ``logs/``, ``commands.txt`` and ``jobs.json``.
        parallel: jobs at a time.
        threads: ``OMP_NUM_THREADS`` of each job.
        cwd: working directory of the jobs.
    """
    logs = runs / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (runs / "commands.txt").write_text("".join(shlex.join(job.argv) + "\n" for job in jobs))
    record_path = runs / "jobs.json"
    records = json.loads(record_path.read_text()) if record_path.is_file() else {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}

    finished = {job.name for job in jobs if job.done_file.is_file()}
    for job in jobs:
        if job.name in finished:
            _copy_kept(job)
    failed: set[str] = set()
    pending = [job for job in jobs if job.name not in finished]
    running: dict[str, tuple[Job, subprocess.Popen, float]] = {}
    started = time.perf_counter()
    print(f"{_stamp()} {len(pending)} jobs to run ({len(finished)} already done), {parallel} at a time", flush=True)
    while pending or running:
        for name, (job, process, t0) in list(running.items()):
            if process.poll() is None:
                continue
            wall = time.perf_counter() - t0
            ok = process.returncode == 0 and job.done_file.is_file()
            (finished if ok else failed).add(name)
            if ok:
                _copy_kept(job)
            records[name] = {"command": shlex.join(job.argv), "wall_time_s": wall, "returncode": process.returncode,
                             "finished": _stamp(), "load_average": os.getloadavg()}  # fmt: skip
            record_path.write_text(json.dumps(records, indent=2) + "\n")
            print(f"{_stamp()} {'done' if ok else 'FAILED'} {name} in {wall:.0f}s", flush=True)
            del running[name]
        blocked = [job for job in pending if any(dep in failed for dep in job.after)]
        for job in blocked:
            print(f"{_stamp()} skip {job.name}: a job it needs failed", flush=True)
            pending.remove(job)
            failed.add(job.name)
        while len(running) < parallel:
            ready = next((job for job in pending if all(dep in finished for dep in job.after)), None)
            if ready is None:
                break
            pending.remove(ready)
            log = (logs / f"{ready.name}.log").open("w")
            process = subprocess.Popen(ready.argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[ready.name] = (ready, process, time.perf_counter())
            print(f"{_stamp()} start {ready.name}", flush=True)
        if not running and pending:
            print(f"{_stamp()} cannot start {[job.name for job in pending]}", flush=True)
            break
        time.sleep(2.0)
    total = time.perf_counter() - started
    print(f"{_stamp()} all jobs ended in {total / 60:.1f} min; {len(failed)} failed", flush=True)
    return failed
