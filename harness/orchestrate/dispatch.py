"""Fan-out: a suite's runs as jobs through submitit (docs/scale-out.md).

The shared preparation happens once, in the process that dispatches: the reference rows
(suite.json), the sizing check and the tokenizer cache. Tuning goes out first, each model's
search (on each corpus) a unit of work, and the dispatching process writes tuning.json from the
trials' records. Then the runs:

- local: `workers` submitit jobs on this machine, each the runner's own loop over the pending
  runs. The per-run locks share the runs out between them, exactly as between processes
  started by hand: no run trains twice, and a run one job holds the others leave to it.
- slurm: one job per pending run, as one job array (at most `workers` at a time).

A job trains a run through the runner's steps and writes its record as a sequential run does.
A job that dies leaves its run's saved training state; the next `harness run` resumes it.
On Slurm a job that is preempted or reaches its time limit is requeued by submitit (RunJob's
`checkpoint`) and resumes likewise. Progress is read from the results folder: a run is done
(record), failed (failure.json), running (its lock is held) or queued.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from harness.orchestrate.attempts import check_shares, failure_summary, run_all, warm_caches
from harness.orchestrate.tuning import trial_scorer, tune_row
from harness.run import distributed
from harness.run.distributed import log
from harness.run.pipeline import load_corpus_data
from harness.run.device import measure_matmul_peak, pick_device
from harness.run.records import read_failure, read_record
from harness.run.spec import ExecutorSettings, Run, Suite
from harness.errors import HarnessError

POLL_S = 2.0  # seconds between looks at the results folder while waiting
SLURM_COMMANDS = ("srun", "sbatch")  # what submitit runs to start and submit jobs
LOCAL_TIMEOUT_MIN = 60 * 24 * 365  # a local job has no time limit (submitit's local default is 2 minutes)


class Requeued:
    """A submitit job that Slurm may preempt or time out: requeued as the same job, it skips what
    is recorded and resumes a run from its saved training state."""

    def checkpoint(self, *args, **kwargs):
        """Called by submitit when Slurm preempts the job or its time runs out: the same job again.
        Nothing to save here: the training state on disk is at most --save-every seconds old."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


class RunJob(Requeued):
    """One submitit job: these runs through the runner's steps, each under its lock. A callable
    class, so that submitit can checkpoint it on Slurm: requeued, it resumes each unfinished run
    from its last saved training state."""

    def __init__(self, suite: Suite, runs: list[Run], out: Path, device_name: str, save_every_s: float,
                 retry_failed: bool, tensorboard_dir: Path | None, threads: int | None = None):
        self.suite, self.runs, self.out, self.device_name = suite, runs, out, device_name
        self.save_every_s, self.retry_failed, self.tensorboard_dir, self.threads = (
            save_every_s, retry_failed, tensorboard_dir, threads)

    def __call__(self) -> list[str]:
        """The ids of the runs that diverged or failed."""
        import submitit

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        if submitit.JobEnvironment().num_tasks > 1:  # one run across this job's GPUs: a DDP process per task
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        device = distributed.start(pick_device(self.device_name))
        peak = measure_matmul_peak(device)
        corpora = {label: load_corpus_data(self.suite, label, device)
                   for label in sorted({run.corpus.label for run in self.runs})}
        failures = []
        try:
            run_all(self.runs, self.suite, corpora, device, peak, self.out, True, self.save_every_s,
                    self.retry_failed, failures, self.tensorboard_dir)
        finally:
            distributed.stop()
        return [f.run_id for f in failures]


class TuneJob(Requeued):
    """One submitit job of the tuning fan-out: each of `rows` (corpus label, model name) whose
    lock it can take, searched through tuning.tune_row. The trials' records are its result: the
    dispatching process then reads them back into tuning.json (tuning.tune_suite)."""

    def __init__(self, suite: Suite, rows: list[tuple[str, str]], out: Path, device_name: str, save_every_s: float,
                 retry_failed: bool, threads: int | None = None):
        self.suite, self.rows, self.out, self.device_name = suite, rows, out, device_name
        self.save_every_s, self.retry_failed, self.threads = save_every_s, retry_failed, threads

    def __call__(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        device = pick_device(self.device_name)
        peak = measure_matmul_peak(device)
        corpora: dict = {}
        scorer = trial_scorer(self.suite, self.out, corpora, device, peak, False, self.save_every_s, self.retry_failed)
        (self.out / "tuning" / "locks").mkdir(parents=True, exist_ok=True)
        for label, name in self.rows:
            lock = FileLock(self.out / "tuning" / "locks" / f"{label}__{name}.lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # another job is tuning this row
            try:
                if label not in corpora:
                    corpora[label] = load_corpus_data(self.suite, label, device)
                corpus = next(c for c in self.suite.corpora if c.label == label)
                tune_row(self.suite, corpus, next(r for r in self.suite.rows if r.name == name), scorer)
            finally:
                lock.release()


def resolved(settings: ExecutorSettings) -> ExecutorSettings:
    """The settings with their machine-dependent defaults filled in."""
    gpus = settings.gpus_per_run
    if gpus is None:
        gpus = 1 if settings.kind == "slurm" or torch.cuda.is_available() else 0
    workers = settings.workers
    if workers is None and settings.kind == "local":
        workers = max(1, torch.cuda.device_count() // gpus) if gpus and torch.cuda.is_available() else 1
    return settings.model_copy(update={"gpus_per_run": gpus, "workers": workers})


def check_executor(settings: ExecutorSettings, device_name: str, suite: Suite) -> ExecutorSettings:
    """The settings resolved, if this machine can run them: checked before any corpus is prepared."""
    settings = resolved(settings)
    if settings.gpus_per_run == 0 and device_name == "cuda":
        raise HarnessError("--device cuda: the runs would get no GPU; give --gpus-per-run 1 or more")
    if settings.kind == "local" and settings.gpus_per_run:
        needed, present = settings.workers * settings.gpus_per_run, torch.cuda.device_count()
        if needed > present:  # a job given no GPU of its own would quietly train on the CPU
            raise HarnessError(f"--workers {settings.workers} x --gpus-per-run {settings.gpus_per_run} needs {needed} "
                               f"GPUs; this machine has {present}")
    if settings.kind == "slurm":
        missing = [command for command in SLURM_COMMANDS if shutil.which(command) is None]
        if missing:
            raise HarnessError(f"--executor slurm: no {' or '.join(f'`{c}`' for c in missing)} on this machine's PATH; "
                               "run it on a Slurm login node")
    check_shares(suite, max(1, settings.gpus_per_run))
    return settings


def make_executor(settings: ExecutorSettings, folder: Path, job_name: str):
    """The submitit executor for `settings` (resolved), writing its job files and logs to `folder`."""
    import submitit

    tasks = max(1, settings.gpus_per_run)
    if settings.kind == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, gpus_per_node=settings.gpus_per_run,
                                   tasks_per_node=tasks)
        return executor
    try:
        executor = submitit.SlurmExecutor(folder=folder)
    except RuntimeError:
        raise HarnessError("--executor slurm: no `srun` on this machine's PATH; run it on a Slurm login node") from None
    optional = {"partition": settings.partition, "account": settings.account, "qos": settings.qos,
                "cpus_per_task": settings.cpus_per_task,
                "mem": None if settings.mem_gb is None else f"{int(settings.mem_gb * 1024)}MB",
                "array_parallelism": settings.workers}
    executor.update_parameters(
        job_name=job_name, time=settings.time_min, nodes=1, ntasks_per_node=tasks,
        gpus_per_node=settings.gpus_per_run or None,
        srun_args=["--kill-on-bad-exit=1"],  # a DDP rank that dies ends its run's other ranks, not a 24 h wait
        **{k: v for k, v in optional.items() if v is not None})
    return executor


def submit(executor, settings: ExecutorSettings, runs: list, job_for) -> list:
    """Send the runs (or tuning rows) out; `job_for(some)` makes the job. Local: `workers` jobs,
    each over all of them (the locks share them out), job i on GPUs i*g .. (i+1)*g-1. Slurm: a job
    per run, all in one job array."""
    if settings.kind == "local":
        jobs, g = [], settings.gpus_per_run
        for i in range(min(settings.workers, len(runs))):
            if g:
                executor.update_parameters(visible_gpus=list(range(i * g, (i + 1) * g)))
            jobs.append(executor.submit(job_for(runs)))
        return jobs
    with executor.batch():  # one sbatch: a job array
        jobs = [executor.submit(job_for([run])) for run in runs]
    return jobs


def job_threads(settings: ExecutorSettings, jobs: int, threads: int | None) -> int | None:
    """torch threads per job: `threads` if given; local CPU jobs share the cores out between the
    jobs that run at once (unless OMP_NUM_THREADS is set); else the job's own default."""
    if threads is None and settings.kind == "local" and not settings.gpus_per_run and "OMP_NUM_THREADS" not in os.environ:
        return max(1, (os.cpu_count() or 1) // min(settings.workers, jobs))
    return threads


def tune_as_jobs(suite: Suite, out: Path, settings: ExecutorSettings, device_name: str, save_every_s: float,
                 retry_failed: bool, threads: int | None = None) -> None:
    """Tuning fanned out: each model's search on each corpus is independent of the others, so
    the rows go out as jobs like the runs (local: `workers` jobs sharing the rows through locks;
    slurm: a job per row). The dispatching process waits, then writes tuning.json from the
    trials' records (tuning.tune_suite), training there any trial a stopped job left undone.
    Runs of several processes each (gpus_per_run > 1) tune in the dispatching process instead."""
    settings = check_executor(settings, device_name, suite)
    rows = [(corpus.label, row.name) for corpus in suite.corpora for row in suite.rows]
    if settings.gpus_per_run > 1 or not rows:
        return
    folder = out / "jobs"
    executor = make_executor(settings, folder, f"harness-{suite.name}-tune")
    device = device_name if settings.gpus_per_run else "cpu"
    per_job = job_threads(settings, len(rows), threads)
    jobs = submit(executor, settings, rows,
                  lambda some: TuneJob(suite, some, out, device, save_every_s, retry_failed, per_job))
    log(f"tuning: {len(rows)} model searches sent out as {len(jobs)} {settings.kind} jobs (logs in {folder})")
    watch(lambda: (f"tuning progress: {sum(1 for _ in (out / 'tuning' / 'runs').glob('*/record.json'))} trials "
                   "recorded", all(job.done() for job in jobs)))
    for why in filter(None, map(job_error, jobs)):
        log(f"warning: a tuning job stopped ({why}); the trials it left undone are trained here")


def dispatch(suite: Suite, runs: list[Run], corpora: dict, out: Path, settings: ExecutorSettings, device_name: str,
             save_every_s: float, retry_failed: bool, tensorboard_dir: Path | None, threads: int | None = None) -> None:
    """Prepare what the runs share, send the pending runs out as jobs, show progress until every
    job has ended; raise one line if a run did not finish. `threads`: torch threads per job (by
    default local CPU jobs share the cores out, unless OMP_NUM_THREADS is set)."""
    settings = check_executor(settings, device_name, suite)
    started = time.time()
    states = {run.run_id: state(suite, run, out, retry_failed, started) for run in runs}
    # a held run is left to the job holding it; the cheapest budgets first, so that a study stopped
    # part way has whole rungs (every row) rather than whole rows
    pending = sorted((run for run in runs if states[run.run_id] == "queued"), key=lambda run: run.budget)
    held_now = [run for run in runs if states[run.run_id] == "running"]
    log(f"{len(runs) - len(pending) - len(held_now)} of {len(runs)} runs done or failed before, {len(held_now)} "
        f"running in other processes; {len(pending)} to run")
    jobs: list = []
    if pending:
        warm_caches(suite, pending, corpora)
        folder = out / "jobs"
        executor = make_executor(settings, folder, f"harness-{suite.name}")
        device = device_name if settings.gpus_per_run else "cpu"
        threads = job_threads(settings, len(pending), threads)

        def job_for(some: list[Run]) -> RunJob:
            return RunJob(suite, some, out, device, save_every_s, retry_failed, tensorboard_dir, threads)

        jobs = submit(executor, settings, pending, job_for)
        log(f"{len(pending)} runs sent out as {len(jobs)} {settings.kind} jobs (logs in {folder})")
    if pending or held_now:
        waited = pending + held_now
        wait(jobs, suite, waited, out, retry_failed, started)
        states.update({run.run_id: state(suite, run, out, retry_failed, started) for run in waited})
    failures = [read_failure(out / "runs" / run.run_id / "failure.json") for run in runs
                if states[run.run_id] == "failed"]
    if failures:
        raise HarnessError(failure_summary(failures, len(runs), out))
    undone = [run.run_id for run in runs if states[run.run_id] != "done"]
    if undone:
        problems = [why for why in map(job_error, jobs) if why]
        raise HarnessError(f"{len(undone)} of {len(runs)} runs did not finish ({', '.join(undone[:3])}"
                           f"{', ...' if len(undone) > 3 else ''}): a job stopped"
                           f"{f' ({problems[0]})' if problems else ''}; logs in {out / 'jobs'}; run the same "
                           "command again to resume")


def wait(jobs: list, suite: Suite, runs: list[Run], out: Path, retry_failed: bool, since: float) -> None:
    """Until every job has ended and no run is held (by these jobs or others), a plain line of
    counts whenever they change."""

    def progress() -> tuple[str, bool]:
        ended = all(job.done() for job in jobs)
        counts = {key: 0 for key in ("done", "running", "failed", "queued")}
        for run in runs:
            counts[state(suite, run, out, retry_failed, since)] += 1
        line = "progress: " + ", ".join(f"{n} {key}" for key, n in counts.items()) + f" (of {len(runs)})"
        return line, ended and counts["running"] == 0

    watch(progress)


def watch(progress) -> None:
    """Log `progress()`'s line whenever it changes, every POLL_S seconds, until it says finished."""
    shown = None
    while True:
        line, finished = progress()
        if line != shown:
            log(line)
            shown = line
        if finished:
            return
        time.sleep(POLL_S)


def job_error(job) -> str | None:
    """The first line of why a job ended badly, or None."""
    try:
        error = job.exception()
    except Exception as e:  # submitit: the job left no result (it was killed)
        error = e
    if error is None:
        return None
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def state(suite: Suite, run: Run, out: Path, retry_failed: bool, since: float) -> str:
    """done (its record, of this config), failed (its failure.json, unless it is to be retried
    and older than `since`), running (its lock is held) or queued; read from the results folder."""
    run_dir = out / "runs" / run.run_id
    config_hash = run.config_hash(suite)
    try:
        if read_record(run_dir / "record.json").config_hash == config_hash:
            return "done"
    except HarnessError:
        pass
    failure = read_failure(run_dir / "failure.json")
    if failure is not None and failure.config_hash == config_hash and (
            not retry_failed or (run_dir / "failure.json").stat().st_mtime >= since):
        return "failed"
    return "running" if held(run_dir / "run.lock") else "queued"


def held(path: Path) -> bool:
    """Whether a process holds this lock (a look that takes it for an instant if it is free)."""
    if not path.exists():
        return False
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False
