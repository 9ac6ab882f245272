"""Scale-out (issue 19): a suite's runs as submitit jobs (local workers here, Slurm checked through
the submission it makes), and one run across processes (DDP, gloo on the CPU)."""

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.orchestrate import attempts
from harness.orchestrate.dispatch import make_executor, resolved, submit
from harness.run.records import read_suite_records
from harness.orchestrate.runner import run_suite
from harness.run.spec import ExecutorSettings, expand
from harness.orchestrate.suite import load_suite
from harness.errors import HarnessError
from tests.checks import kill_while_training
from tests.conftest import ROOT, tiny_suite


@pytest.fixture
def one_thread(monkeypatch):
    """One thread in this process and in every job it starts, so that runs in different processes
    do the same float arithmetic; the jobs import the harness from this work tree."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(args: list) -> int:
    return main([str(a) for a in args])


def same_results(a, b) -> None:
    assert a.run_id == b.run_id and a.config_hash == b.config_hash
    assert a.loss_curve == b.loss_curve
    assert a.val.window_nll_nats == b.val.window_nll_nats and a.test.window_nll_nats == b.test.window_nll_nats
    assert (a.bytes_seen, a.steps, a.training_flops) == (b.bytes_seen, b.steps, b.training_flops)


def test_two_local_workers_give_the_sequential_records_and_train_each_run_once(write_suite, tmp_path, one_thread,
                                                                                 capsys):
    path = write_suite(tiny_suite(seeds=[0, 1, 2], budgets=[1e9]))
    sequential = read_suite_records(run_suite(path, tmp_path / "sequential", "cpu", show_progress=False))

    capsys.readouterr()
    assert cli(["run", path, "--results", tmp_path / "jobs", "--device", "cpu", "--quiet",
                "--executor", "local", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 runs sent out as 2 local jobs" in out
    assert "progress: 3 done, 0 running, 0 failed, 0 queued (of 3)" in out
    fanned = read_suite_records(tmp_path / "jobs" / "tiny")
    assert len(fanned) == 3
    for a, b in zip(sequential, fanned):
        same_results(a, b)
        assert b.resumed_at_step is None
    logs = "".join(p.read_text() for p in (tmp_path / "jobs" / "tiny" / "jobs").glob("*_log.out"))
    trained = [line.split("] ")[1].split(":")[0] for line in logs.splitlines() if line.endswith(": training")]
    assert sorted(trained) == [r.run_id for r in fanned]  # each run trained once, by one of the workers

    # started again, nothing is sent out
    assert cli(["run", path, "--results", tmp_path / "jobs", "--device", "cpu", "--quiet", "--workers", "2"]) == 0
    assert "3 of 3 runs done or failed before, 0 running in other processes; 0 to run" in capsys.readouterr().out


def test_on_busy_cores_a_plain_run_goes_out_as_one_thread_workers(write_suite, tmp_path, monkeypatch, capsys):
    """docs/speed.md, "Threads": where other jobs' ready threads fill every core, `harness run` sends
    the runs out as one-thread local workers, one per core; a core free, or the threads given, and
    they stay in this process."""
    monkeypatch.delenv("HARNESS_WORKERS_WHEN_BUSY")  # tests/conftest.py keeps runs in their process
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setenv("HARNESS_OTHER_THREADS", "4")
    threads = torch.get_num_threads()
    path = write_suite(tiny_suite(seeds=[0, 1], budgets=[1e9]))
    try:
        assert cli(["run", path, "--results", tmp_path / "busy", "--device", "cpu", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "4 threads of other jobs are ready to run on 2, so the runs go out as 2 one-thread local workers" in out
    assert "2 runs sent out as 2 local jobs" in out
    records = read_suite_records(tmp_path / "busy" / "tiny")
    assert len(records) == 2 and {r.threads for r in records} == {1}
    for env, args in (({"HARNESS_OTHER_THREADS": "1"}, []), ({}, ["--threads", "1"]),
                      ({"HARNESS_WORKERS_WHEN_BUSY": "0"}, [])):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        try:
            assert cli(["run", path, "--results", tmp_path / "here", "--device", "cpu", "--quiet", *args]) == 0
        finally:
            torch.set_num_threads(threads)
        assert "local workers" not in capsys.readouterr().out
        monkeypatch.setenv("HARNESS_OTHER_THREADS", "4")


def test_a_killed_local_worker_resumes_its_run_when_the_suite_starts_again(write_suite, tmp_path, one_thread):
    path = write_suite(tiny_suite(budgets=[1e10]))
    results = tmp_path / "results"
    command = [sys.executable, "-m", "harness.cli", "run", str(path), "--results", str(results), "--device", "cpu",
               "--quiet", "--save-every", "0", "--executor", "local", "--workers", "1"]
    kill_while_training(command, results / "tiny" / "runs")  # the driver, the job controller and the job

    assert cli(command[3:]) == 0
    resumed = read_suite_records(results / "tiny")[0]
    assert resumed.resumed_at_step > 0 and resumed.steps > resumed.resumed_at_step
    same_results(resumed, read_suite_records(run_suite(path, tmp_path / "straight", "cpu", show_progress=False))[0])


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """`srun` and `sbatch` on PATH; sbatch keeps a copy of the file it is given and answers as Slurm does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {"srun": "#!/bin/sh\nexit 0\n",
               "sbatch": f"#!/bin/sh\ncp \"$1\" {tmp_path / 'submitted.sh'}\necho 'Submitted batch job 4242'\n"}
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "submitted.sh"


def test_the_slurm_submission_is_one_array_of_requeueable_run_jobs(write_suite, tmp_path, fake_slurm):
    import submitit

    from harness.orchestrate.dispatch import RunJob

    suite = load_suite(write_suite(tiny_suite(seeds=[0, 1])))
    runs = expand(suite)
    settings = resolved(ExecutorSettings(kind="slurm", partition="gpu", account="lab", qos="high", time_min=90,
                                         gpus_per_run=2, workers=1, cpus_per_task=6, mem_gb=32))
    folder = tmp_path / "results" / "tiny" / "jobs"
    executor = make_executor(settings, folder, "harness-tiny")
    jobs = submit(executor, settings, runs,
                  lambda some: RunJob(suite, some, tmp_path / "results" / "tiny", "auto", 60.0, False, None))

    assert [job.job_id for job in jobs] == ["4242_0", "4242_1"]
    text = fake_slurm.read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --qos=high", "#SBATCH --time=90",
                 "#SBATCH --job-name=harness-tiny", "#SBATCH --nodes=1", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=6", "#SBATCH --mem=32768MB",
                 "#SBATCH --array=0-1%1",  # one job per run, at most `workers` at a time
                 "#SBATCH --signal=USR2@90"):  # submitit's warning before the time limit: checkpoint, requeue
        assert line in text.splitlines(), (line, text)
    command = text.splitlines()[-1]
    assert command.startswith("srun --unbuffered --output ") and "--kill-on-bad-exit=1" in command
    assert command.endswith(f"{sys.executable} -u -m submitit.core._submit {folder}")

    for i, run in enumerate(runs):  # what each array task will run: one run, and on preemption itself again
        delayed = submitit.helpers.DelayedSubmission.load(folder / f"4242_{i}_submitted.pkl")
        job = delayed.function
        assert isinstance(job, RunJob) and [r.run_id for r in job.runs] == [run.run_id]
        again = job.checkpoint()
        assert isinstance(again, submitit.helpers.DelayedSubmission) and again.function is job


def test_slurm_without_a_cluster_and_bad_executor_settings_are_one_line(write_suite, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    path = write_suite(tiny_suite())
    results = tmp_path / "results"
    cases = [
        (["--executor", "slurm"], "--executor slurm: no `srun` or `sbatch` on this machine's PATH"),
        (["--workers", "0"], "--workers: Input should be greater than 0"),
        (["--executor", "local", "--partition", "gpu"], "--partition: partition is a Slurm setting; the executor is local"),
        (["--executor", "none", "--workers", "2"], "--workers: only with --executor local or slurm"),
        (["--nproc", "0"], "--nproc: 0; give 1 or more processes"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert cli(["run", path, "--results", results, "--device", "cpu", "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("harness: error: ") and message in err and len(err.strip().splitlines()) == 1, err
    bad = write_suite(tiny_suite(executor={"kind": "local", "workers": -1}), "bad.yaml")
    with pytest.raises(HarnessError, match=r"bad.yaml: executor.workers: Input should be greater than 0"):
        load_suite(bad)
    with pytest.raises(HarnessError, match=r"trainer.batch_windows: 8 windows do not split evenly over 3 processes"):
        attempts.check_shares(load_suite(path), 3)
    assert not (results / "tiny" / "runs").exists()


def test_a_run_across_two_gloo_processes_matches_the_single_process_run(write_suite, tmp_path, one_thread):
    path = write_suite(tiny_suite(budgets=[3e9]))
    single = read_suite_records(run_suite(path, tmp_path / "single", "cpu", show_progress=False))[0]
    import subprocess

    done = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(path), "--results", str(tmp_path / "ddp"),
                           "--device", "cpu", "--quiet", "--nproc", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(": training") == 1  # rank 0 alone speaks
    ddp = read_suite_records(tmp_path / "ddp" / "tiny")[0]
    assert ddp.processes == 2 and single.processes is None
    # the same global batch, bytes and FLOPs; each rank trained on half of every batch
    assert (ddp.steps, ddp.batch_bytes, ddp.bytes_seen, ddp.training_flops) == (
        single.steps, single.batch_bytes, single.bytes_seen, single.training_flops)
    assert [p.step for p in ddp.loss_curve] == [p.step for p in single.loss_curve]
    for a, b in zip(ddp.loss_curve, single.loss_curve):
        assert a.train_bpb == pytest.approx(b.train_bpb, rel=1e-4, abs=2e-5)
    assert ddp.test.bpb == pytest.approx(single.test.bpb, rel=1e-4)
    assert "processes" not in (tmp_path / "single" / "tiny" / "runs" / single.run_id / "record.json").read_text()

    if not torch.cuda.is_available():  # an error met inside the processes: still one line, from rank 0
        done = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(path), "--results", str(tmp_path / "cu"),
                               "--device", "cuda", "--quiet", "--nproc", "2"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and done.stderr == "harness: error: --device cuda: no CUDA device is available\n"


def test_local_workers_need_a_gpu_each_when_runs_get_gpus(write_suite, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    path = write_suite(tiny_suite())
    capsys.readouterr()
    assert cli(["run", path, "--results", tmp_path, "--device", "cpu", "--quiet", "--executor", "local",
                "--workers", "2", "--gpus-per-run", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "harness: error: --workers 2 x --gpus-per-run 1 needs 2 GPUs; this machine has 1"


def test_each_rank_trains_on_its_own_share_of_the_batch(monkeypatch):
    from harness.run import distributed

    batch = torch.arange(16).view(8, 2)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    shares = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(distributed.shard(batch))
    assert [s.shape[0] for s in shares] == [4, 4] and torch.equal(torch.cat(shares), batch)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(HarnessError, match="8 windows does not split evenly over 3 processes"):
        distributed.shard(batch)


def test_tuning_fans_out_by_model_and_chooses_as_the_sequential_search(write_suite, tmp_path, one_thread, capsys):
    """Each model's search is a unit of work: with 2 local workers the models' searches go out as
    jobs, every trial trains once (in a job), and tuning.json is the sequential one."""
    second = {"name": "bytes-wide", "adapter": "bytes", "config": {"d_model": 48, "n_layers": 1, "n_heads": 2}}
    tune = {"budgets": [1e9], "lr": [1e-3, 3e-3, 1e-2], "max_extensions": 2}
    path = write_suite(tiny_suite(budgets=[1e9], tune=tune, models=[*tiny_suite()["models"], second]))
    run_suite(path, tmp_path / "sequential", "cpu", show_progress=False)

    capsys.readouterr()
    assert cli(["run", path, "--results", tmp_path / "jobs", "--device", "cpu", "--quiet",
                "--executor", "local", "--workers", "2"]) == 0
    assert "tuning: 2 model searches sent out as 2 local jobs" in capsys.readouterr().out
    entries = [json.loads((tmp_path / where / "tiny" / "tuning.json").read_text())["entries"]
               for where in ("sequential", "jobs")]
    assert entries[0] == entries[1] and [e["model"] for e in entries[0]] == ["bytes", "bytes-wide"]
    logs = "".join(p.read_text() for p in (tmp_path / "jobs" / "tiny" / "jobs").glob("*_log.out"))
    trained = [line.split("tuning ")[1].split(":")[0] for line in logs.splitlines()
               if "tuning tune__" in line and line.endswith(": training")]
    assert sorted(trained) == sorted(i for e in entries[1] for t in e["trials"] for i in t["run_ids"])


def test_jobs_take_the_cheapest_rungs_first(write_suite, monkeypatch):
    """A study stopped part way has whole rungs: the pending runs go out smallest budget first."""
    from harness.orchestrate import dispatch

    suite = load_suite(write_suite(tiny_suite(budgets=[4e9, 1e9, 2e9], seeds=[0, 1])))
    sent = []
    monkeypatch.setattr(dispatch, "warm_caches", lambda *args: None)
    monkeypatch.setattr(dispatch, "make_executor", lambda *args: None)
    monkeypatch.setattr(dispatch, "submit", lambda executor, settings, runs, job_for: sent.extend(runs) or [])
    monkeypatch.setattr(dispatch, "wait", lambda *args: None)
    with pytest.raises(HarnessError, match="6 of 6 runs did not finish"):
        dispatch.dispatch(suite, expand(suite), {}, Path("/nonexistent"), ExecutorSettings(kind="local"), "cpu", 60.0,
                          False, None)
    assert [run.budget for run in sent] == [1e9, 1e9, 2e9, 2e9, 4e9, 4e9] and [r.seed for r in sent[:2]] == [0, 1]
