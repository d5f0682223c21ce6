"""``fedscan sweep``: Ray core schedules the trials, each one a process-isolated ``fedscan run``.

The driver (this module) validates the whole sweep first (:mod:`server.sweep_spec`), then
connects to Ray: ``--address local`` starts a private, scheduler-only Ray (the trials' heavy
work runs in their own child processes, each with its own Flower Ray), ``auto``,
``host:port`` or ``ray://...`` join an existing cluster. Each trial is one Ray task
(:func:`server.sweep_trial.run_trial`, ``max_retries=0``) that reserves the CPUs, memory
and GPUs its federation needs; a ``ray.wait`` loop keeps at most ``max-parallel`` of them
in flight and records each result the moment it arrives:

- ``results.csv``: long format, ``trial``, the swept keys, then ``round,site,split,metric,value``
  (the run's ``metrics.csv`` rows, and its ``privacy.csv`` as ``split = privacy`` rows);
- ``trials.jsonl``: one line per trial: id, swept values, config, status, error, node,
  wall time, peak memory, log tail;
- ``sweep.json``: the sweep's settings; at the end ``sweep_report.md`` and ``sweep_report.html``.

Results travel as Ray objects (the task's return value), never through the trials' folders:
on a cluster those are on other machines.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from server.launcher import EXIT_OK, EXIT_RUN_FAILED, UserError, new_launch_id, stop_signals, toml_value
from server.sweep_spec import SweepSpec, TrialSpec
from server.sweep_trial import (
    STATUS_COMPLETED,
    STATUS_ERROR,
    STATUS_INTERRUPTED,
    STATUS_TIMED_OUT,
    StopFlag,
)

RESULTS_CSV = "results.csv"
TRIALS_JSONL = "trials.jsonl"
SWEEP_JSON = "sweep.json"
LONG_COLUMNS = ("round", "site", "split", "metric", "value")
PRIVACY_SPLIT = "privacy"
DRIVER_OBJECT_STORE_BYTES = 100 * 1024**2
"""The private Ray only carries results (a few MB); its object store stays small."""
CANCEL_WAIT_S = 60.0
BACKSTOP_S = 180.0
"""A task still running this long past its trial's timeout is force-cancelled."""



# --------------------------------------------------------------------------- #
# The sweep folder                                                            #
# --------------------------------------------------------------------------- #


def _csv_value(value: Any) -> Any:
    return toml_value(value) if isinstance(value, bool) else value


class SweepFolder:
    """``results.csv``, ``trials.jsonl`` and ``sweep.json`` of one sweep, appended as results arrive.

    With ``resume``, the rows and lines of trials that completed (and are still in the
    sweep) are kept; everything else is dropped, so a rerun trial never appears twice.
    """

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec
        self.folder = spec.folder
        self.columns = ["trial", *spec.swept_keys, *LONG_COLUMNS]

    @property
    def results(self) -> Path:
        return self.folder / RESULTS_CSV

    @property
    def trials(self) -> Path:
        return self.folder / TRIALS_JSONL

    def previous_records(self) -> list[dict[str, Any]]:
        """The lines of ``trials.jsonl`` (the latest per trial), or [] if there is none."""
        records: dict[str, dict[str, Any]] = {}
        try:
            lines = self.trials.read_text().splitlines()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise UserError(f"Cannot read '{self.trials}' ({type(err).__name__}).") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records[str(record["trial"])] = record
            except (ValueError, KeyError, TypeError):
                raise UserError(f"Line {number} of '{self.trials}' is not a trial record; move the file away "
                                "to start the sweep afresh.") from None
        return list(records.values())

    def check_new(self) -> None:
        """Refuse to overwrite a sweep folder that already holds results (without ``--resume``)."""
        if self.trials.exists() or self.results.exists():
            raise UserError(
                f"The sweep folder '{self.folder}' already holds results; pass --resume to continue that sweep "
                "(finished trials are kept), or set another [sweep] name or output-dir."
            )

    def start(self, resume: bool, address: str) -> set[str]:
        """Create (or, resuming, prune) the files; return the ids of trials already completed."""
        wanted = {t.trial_id for t in self.spec.trials}
        done: set[str] = set()
        kept: list[dict[str, Any]] = []
        if resume:
            for record in self.previous_records():
                if record.get("status") == STATUS_COMPLETED and record["trial"] in wanted:
                    done.add(record["trial"])
                    kept.append(record)
        self.folder.mkdir(parents=True, exist_ok=True)
        rows = self._completed_rows(done) if resume else []
        self._write_atomic(self.results, self._csv_text([self.columns, *rows]))
        self._write_atomic(self.trials, "".join(json.dumps(r, default=str) + "\n" for r in kept))
        meta = {
            "name": self.spec.name, "scenario": self.spec.scenario, "sweep_file": str(self.spec.file),
            "swept_keys": list(self.spec.swept_keys),
            "seed_key": self.spec.seed_key, "trials": [t.trial_id for t in self.spec.trials], "address": address,
            "code_digest": self.spec.code_digest, "timeout_s": self.spec.timeout_s,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self._write_atomic(self.folder / SWEEP_JSON, json.dumps(meta, indent=2) + "\n")
        return done

    def _completed_rows(self, done: set[str]) -> list[list[Any]]:
        """Rows of completed trials from the previous results.csv, in this sweep's columns."""
        swept = {t.trial_id: t.swept for t in self.spec.trials}
        rows: list[list[Any]] = []
        try:
            with self.results.open(newline="") as f:
                for row in csv.DictReader(f):
                    trial = row.get("trial", "")
                    if trial in done:
                        values = [_csv_value(swept[trial][k]) for k in self.spec.swept_keys]
                        rows.append([trial, *values, *(row.get(c, "") for c in LONG_COLUMNS)])
        except FileNotFoundError:
            pass
        except (OSError, csv.Error) as err:
            raise UserError(f"Cannot read '{self.results}' ({type(err).__name__}); move it away to start "
                            "afresh.") from None
        return rows

    def append(self, trial: TrialSpec, result: Mapping[str, Any]) -> None:
        """Record one finished trial: its rows into results.csv, then its line into trials.jsonl."""
        values = [_csv_value(trial.swept[k]) for k in self.spec.swept_keys]
        rows = [[trial.trial_id, *values, *row] for row in long_rows(result)]
        with self.results.open("a", newline="") as f:
            csv.writer(f).writerows(rows)
        record = {
            "trial": trial.trial_id, "index": trial.index, "swept": trial.swept, "config": trial.resolved,
            "federation": trial.plan.federation_config,
            **{k: v for k, v in result.items() if k not in ("metrics", "privacy", "config", "trial")},
            "run_config_json": result.get("config"),
        }
        with self.trials.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    @staticmethod
    def _csv_text(rows: list[list[Any]]) -> str:
        import io

        out = io.StringIO()
        csv.writer(out).writerows(rows)
        return out.getvalue()

    @staticmethod
    def _write_atomic(path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def long_rows(result: Mapping[str, Any]) -> list[list[str]]:
    """A trial's ``metrics.csv`` rows, then its ``privacy.csv`` melted: ``round, site, split, metric, value``."""
    rows: list[list[str]] = []
    metrics = result.get("metrics") or []
    if metrics and tuple(metrics[0]) == LONG_COLUMNS:
        rows += [list(r) for r in metrics[1:] if len(r) == len(LONG_COLUMNS)]
    privacy = result.get("privacy") or []
    if privacy:
        header = privacy[0]
        for r in privacy[1:]:
            if len(r) != len(header):
                continue
            record = dict(zip(header, r, strict=True))
            for column in header:
                if column not in ("round", "site"):
                    rows.append([record["round"], record["site"], PRIVACY_SPLIT, column, record[column]])
    return rows


# --------------------------------------------------------------------------- #
# Progress                                                                    #
# --------------------------------------------------------------------------- #


class Progress:
    """Per-trial start and end lines, and one status line (done / running / failed / ETA).

    On a terminal the status line is rewritten in place; otherwise it is printed as a plain
    line whenever a trial ends.
    """

    def __init__(self, total: int, out: TextIO, skipped: int = 0) -> None:
        self.total, self.out, self.skipped = total, out, skipped
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.done = self.failed = self.running = 0
        self.started = time.monotonic()
        self.walls: list[float] = []
        self.parallel = 1
        self._drawn = False

    def _print(self, line: str) -> None:
        if self.tty and self._drawn:
            self.out.write("\r\033[K")
        self.out.write(line + "\n")
        self._drawn = False
        self.out.flush()

    def status_line(self) -> str:
        left = self.total - self.skipped - self.done - self.failed
        eta = ""
        if self.walls and left > 0:
            per = sum(self.walls) / len(self.walls)
            eta = f", ETA {_duration(per * math.ceil(left / max(1, self.parallel)))}"
        skipped = f" ({self.skipped} already done)" if self.skipped else ""
        return (f"{self.done + self.skipped}/{self.total} done{skipped}, {self.running} running, "
                f"{self.failed} failed, {_duration(time.monotonic() - self.started)} elapsed{eta}")

    def tick(self) -> None:
        if self.tty:
            self.out.write("\r\033[K" + self.status_line())
            self.out.flush()
            self._drawn = True

    def trial_started(self, trial: TrialSpec, number: int) -> None:
        self.running += 1
        self._print(f"[{number}/{self.total}] {trial.trial_id} started: {trial.label()} -> "
                    f"{trial.plan.run_config['output-dir']}")

    def trial_ended(self, trial: TrialSpec, number: int, result: Mapping[str, Any]) -> None:
        self.running -= 1
        ok = result["status"] == STATUS_COMPLETED
        if ok:
            self.done += 1
        else:
            self.failed += 1
        self.walls.append(float(result.get("wall_s") or 0.0))
        node = (result.get("node") or {}).get("hostname") or "?"
        where = result.get("run_dir") or trial.plan.run_config["output-dir"]
        error = "" if ok else f": {result.get('error')}"
        self._print(f"[{number}/{self.total}] {trial.trial_id} {result['status']} in "
                    f"{float(result.get('wall_s') or 0):.1f} s on {node}{error} -> {where}")
        if not self.tty:
            self._print(f"sweep: {self.status_line()}")

    def note(self, line: str) -> None:
        self._print(line)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# --------------------------------------------------------------------------- #
# Ray                                                                         #
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def ray_session(address: str, spec: SweepSpec, max_parallel: int | None) -> Iterator[tuple[int, str]]:
    """Connect to Ray (``local``: a private one), yield ``(parallel, description)``, disconnect.

    Raises
    ------
    UserError
        Ray cannot be reached at ``address``, or a trial needs more than any node has.
    """
    import logging

    import ray

    os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    largest = max(spec.trials, key=lambda t: t.cpus)
    temp: Path | None = None
    try:
        if address == "local":
            cores = os.cpu_count() or 1
            parallel = max_parallel or max(1, cores // largest.cpus)
            cpus = max(cores, parallel * largest.cpus)
            # Short and private: Ray's socket paths must fit in 107 bytes, and a bare
            # ray.init() elsewhere must never find (and join) this cluster.
            temp = Path(tempfile.mkdtemp(prefix="fs-", dir="/tmp"))
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, _temp_dir=str(temp),
                     object_store_memory=DRIVER_OBJECT_STORE_BYTES, logging_level=logging.ERROR,
                     log_to_driver=False)
            shared = f", sharing {cores} cores" if cpus > cores else ""
            described = f"a private Ray ({cpus} CPUs for trials{shared})"
        else:
            try:
                ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
            except Exception as err:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError ...
                message = " ".join(str(err).split())[:300]
                raise UserError(f"Cannot connect to the Ray cluster at --address {address!r}: {message}") from None
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            sizes = [int(n.get("Resources", {}).get("CPU", 0)) for n in nodes]
            for trial in spec.trials:
                if trial.cpus > max(sizes, default=0):
                    raise UserError(
                        f"Trial {trial.index + 1} ({trial.label()}) needs {trial.cpus} CPUs and the largest node "
                        f"of the cluster at {address!r} has {max(sizes, default=0)}; lower its hospitals, "
                        "client-resources-num-cpus or [sweep] cpus-per-trial."
                    )
            fit = sum(size // largest.cpus for size in sizes)
            parallel = max_parallel or max(1, fit)
            described = f"the Ray cluster at {address} ({len(nodes)} nodes, {sum(sizes)} CPUs)"
        yield parallel, described
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def _remote_trial() -> Any:
    import ray

    from server.sweep_trial import run_trial

    return ray.remote(max_retries=0)(run_trial)


def _task_error(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[-400:]}"


def run_sweep(
    spec: SweepSpec,
    *,
    address: str = "local",
    resume: bool = False,
    out: TextIO = sys.stdout,
    cancel: threading.Event | None = None,
    grace: float = 3.0,
) -> int:
    """Run every trial of ``spec`` not already done; write the sweep folder; return the exit code.

    Returns
    -------
    int
        0 every trial completed, 1 some failed or timed out, 128 + the signal number when a
        signal stopped the sweep (130 when ``cancel`` was set).

    Raises
    ------
    UserError
        Results already in the sweep folder without ``resume``, an unreachable cluster or an
        infeasible trial; nothing was written.
    """
    import ray

    from server.launcher import ProcessSweeper

    folder = SweepFolder(spec)
    if not resume:
        folder.check_new()
    else:
        folder.previous_records()  # readable, or one sentence before anything starts
    cancel = cancel or threading.Event()
    # Ray's driver installs its own SIGTERM handler (it logs and exits 1): ours go in after it.
    with ray_session(address, spec, spec.max_parallel) as (parallel, where), stop_signals(cancel) as received:
        done = folder.start(resume, address)
        todo = [t for t in spec.trials if t.trial_id not in done]
        progress = Progress(len(spec.trials), out, skipped=len(spec.trials) - len(todo))
        progress.parallel = parallel
        progress.note(f"sweep {spec.name}: {len(spec.trials)} trials ({len(done)} already done), up to {parallel} "
                      f"at once on {where}; results in {spec.folder}")
        remote = _remote_trial()
        stop_flag: Any = ray.remote(num_cpus=0)(StopFlag).remote()
        running: dict[Any, tuple[TrialSpec, str, float]] = {}
        stopped_launches: list[str] = []
        pending = list(todo)
        failed = 0

        def finish(ref: Any, result: Mapping[str, Any]) -> None:
            nonlocal failed
            trial, _launch, _t0 = running.pop(ref)
            folder.append(trial, result)
            failed += result["status"] != STATUS_COMPLETED
            progress.trial_ended(trial, trial.index + 1, result)

        def lost(ref: Any, status: str, error: str) -> dict[str, Any]:
            trial, launch_id, t0 = running[ref]
            return {"trial": trial.trial_id, "status": status, "exit_code": EXIT_RUN_FAILED, "error": error,
                    "wall_s": time.monotonic() - t0, "launch_id": launch_id, "node": None, "run_dir": None,
                    "log_tail": [], "peak_rss_bytes": None}

        while (pending or running) and not cancel.is_set():
            while pending and len(running) < parallel and not cancel.is_set():
                trial = pending.pop(0)
                launch_id = new_launch_id()
                payload = {
                    "trial": trial.trial_id, "project": str(spec.project), "run_config": trial.plan.run_config,
                    "federation": trial.plan.federation_config, "timeout_s": spec.timeout_s,
                    "launch_id": launch_id, "code_digest": spec.code_digest, "grace": grace,
                    "stop_flag": stop_flag,
                }
                ref = remote.options(num_cpus=trial.cpus, memory=trial.memory_bytes, num_gpus=trial.gpus or None,
                                     name=f"trial-{trial.trial_id}").remote(payload)
                running[ref] = (trial, launch_id, time.monotonic())
                progress.trial_started(trial, trial.index + 1)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in ready:
                try:
                    result = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - a crashed worker or task: recorded, the sweep goes on
                    result = lost(ref, STATUS_ERROR, _task_error(err))
                finish(ref, result)
            for ref, (_trial, _launch, t0) in list(running.items()):
                if time.monotonic() - t0 > spec.timeout_s + BACKSTOP_S:
                    ray.cancel(ref, force=True)
                    finish(ref, lost(ref, STATUS_TIMED_OUT, f"the task outlived its {spec.timeout_s:g} s timeout "
                                     f"by {BACKSTOP_S:g} s and was force-cancelled"))
            progress.tick()

        if cancel.is_set():
            progress.note(f"sweep {spec.name}: stopping {len(running)} running trial(s) ...")
            stopped_launches = [launch_id for _t, launch_id, _t0 in running.values()]
            ray.get(stop_flag.set.remote())  # each trial stops its launch and returns (interrupted)
            deadline = time.monotonic() + CANCEL_WAIT_S
            while running and time.monotonic() < deadline:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
                for ref in ready:
                    try:
                        result = ray.get(ref)
                    except Exception:  # noqa: BLE001 - TaskCancelledError: the usual outcome
                        result = lost(ref, STATUS_INTERRUPTED, "stopped by the sweep (Ctrl-C or SIGTERM)")
                    finish(ref, result)
            for ref in list(running):
                ray.cancel(ref, force=True)
                finish(ref, lost(ref, STATUS_INTERRUPTED, "stopped by the sweep (Ctrl-C or SIGTERM); force-cancelled"))
    if address == "local":  # a backstop, once Ray is down: nothing a trial started may outlive the sweep
        for launch_id in stopped_launches:
            ProcessSweeper(launch_id).stop(grace=1.0)
    progress.note(f"sweep {spec.name}: {progress.done + progress.skipped}/{len(spec.trials)} completed, "
                  f"{failed} failed, in {_duration(time.monotonic() - progress.started)}")
    _report(spec, out)
    if cancel.is_set():
        return 128 + received[0] if received else 130
    return EXIT_RUN_FAILED if failed else EXIT_OK


def _report(spec: SweepSpec, out: TextIO) -> None:
    from server.sweep_report import build_sweep_report

    try:
        md, html = build_sweep_report(spec.folder)
    except Exception as err:  # noqa: BLE001 - the results are written; a report failure must not hide them
        out.write(f"sweep {spec.name}: could not build the report ({type(err).__name__}: {err})\n")
        return
    out.write(f"sweep {spec.name}: report {md} and {html}\n")
