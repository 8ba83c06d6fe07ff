"""Fault tolerance on real Ray processes: a two-node cluster on localhost (`ray start` head + worker) that
loses its worker mid-trial, and a `flexora-tune compare` driver killed mid-sweep and resumed.

Isolation: every Ray process here is a subprocess with its own temp dir (so no other `ray.init()` on this
machine can find it) and a marker in its environment; teardown SIGKILLs exactly the processes carrying
this test's marker (Ray workers inherit it), never `ray stop`, which would end every Ray on the machine,
including the in-process session other tests share.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psutil
import pytest

pytestmark = pytest.mark.cluster

BIN = Path(sys.executable).parent
MARKER = "FLEXORA_TEST_RAY"  # every process a test starts carries MARKER=<tag>
ROLE = "FLEXORA_TEST_RAY_ROLE"  # head, worker or driver
FAST_NODE_DEATH = {  # the GCS declares a lost node dead after ~3 s instead of ~30 s
    "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3",
}


def _env(tag: str, role: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    return {**env, MARKER: tag, ROLE: role, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def _marked(tag: str, role: str | None = None) -> list[psutil.Process]:
    """Processes whose environment holds MARKER=tag (and ROLE=role). /proc/PID/environ is searched as raw
    bytes: Ray renames its agents with setproctitle, which leaves psutil's parsed environ empty."""
    wanted = [f"{MARKER}={tag}\0".encode(), *([f"{ROLE}={role}\0".encode()] if role else [])]
    found = []
    for proc in psutil.process_iter():
        try:
            raw = Path(f"/proc/{proc.pid}/environ").read_bytes()
        except OSError:
            continue
        if all(w in raw for w in wanted):
            found.append(proc)
    return found


def _kill(tag: str, role: str | None = None, *, groups: tuple[int, ...] = (), pids: tuple[int, ...] = (),
          timeout: float = 20) -> None:
    """SIGKILL, until none is left, every process that carries the marker (and role), or sits in one of the
    process groups / sessions `groups` (a `ray start`/driver started with start_new_session: its GCS, raylet
    and agents; Ray's agents wipe their environment with setproctitle), or is in `pids`, and all their
    descendants (Ray workers run in sessions of their own)."""
    deadline = time.time() + timeout
    while True:
        procs: dict[int, psutil.Process] = {p.pid: p for p in _marked(tag, role)}
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) in groups or os.getsid(proc.pid) in groups or proc.pid in pids:
                    procs[proc.pid] = proc
            except OSError:
                continue
        for proc in list(procs.values()):
            try:
                procs.update((c.pid, c) for c in proc.children(recursive=True))
            except psutil.Error:
                pass
        live = []
        for proc in procs.values():
            try:
                if proc.status() != psutil.STATUS_ZOMBIE and proc.pid != os.getpid():
                    live.append(proc)
            except psutil.Error:
                pass
        if not live:
            return
        assert time.time() < deadline, f"Ray processes survived teardown: {[(p.pid, p.name()) for p in live]}"
        for proc in live:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(live, timeout=2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def _results(trial_dir: Path) -> list[dict]:
    """The reports of a trial so far (result.json, one JSON object a line; a half-written last line is skipped)."""
    rows = []
    path = trial_dir / "result.json"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def _running_trial(storage: Path, arm: str) -> tuple[Path, list[dict]] | None:
    """A trial of `arm` in the comparison's one experiment that has reported but not finished: (its dir, its
    reports so far)."""
    for trial_dir in storage.glob("comparison/trainable_*"):
        rows = _results(trial_dir)
        if rows and rows[0].get("arm") == arm and not rows[-1]["final"]:
            return trial_dir, rows
    return None


def _compare_args(model: Path, csv: Path, out: Path, strategies: str, *extra: str) -> list[str]:
    return [str(BIN / "flexora-tune"), "compare", "--model", str(model), "--task", str(csv), "--max-length", "32",
            "--strategies", strategies, "--seeds", "1", "--trials", "2", "--max-steps", "12", "--eval-every", "1",
            "--lr", "1e-2", "--search-steps", "4", "--out", str(out), *extra]


def _start_node(args: list[str], env: dict[str, str], log: Path, groups: list[int]) -> subprocess.Popen:
    """`ray start ... --block` in a session of its own (its pid joins `groups`, for teardown); waits until up."""
    proc = subprocess.Popen([str(BIN / "ray"), "start", *args, "--block", "--disable-usage-stats"], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    groups.append(proc.pid)
    _wait_for(lambda: "Ray runtime started" in log.read_text(), 90, f"ray start {args[0]}", proc, log)
    return proc


@pytest.fixture
def two_nodes(tmp_path) -> Iterator[dict]:
    """A head and a worker node, separate `ray start --block` processes with 1 CPU each and distinct custom
    resources; torn down by killing exactly their processes."""
    tag = uuid.uuid4().hex
    temp_dirs = [tempfile.mkdtemp(prefix="ftrh", dir="/tmp"), tempfile.mkdtemp(prefix="ftrw", dir="/tmp")]
    port = _free_port()
    groups: list[int] = []
    try:
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0"]
        head = _start_node(["--head", f"--port={port}", *common, "--include-dashboard=false",
                            f"--temp-dir={temp_dirs[0]}", '--resources={"head_slot": 1}'],
                           _env(tag, "head", **FAST_NODE_DEATH), tmp_path / "head.log", groups)
        worker = _start_node([f"--address=127.0.0.1:{port}", *common, f"--temp-dir={temp_dirs[1]}",
                              '--resources={"worker_slot": 1}'],
                             _env(tag, "worker"), tmp_path / "worker.log", groups)
        yield {"address": f"127.0.0.1:{port}", "tag": tag, "head": head.pid, "worker": worker.pid, "groups": groups}
    finally:
        _kill(tag, groups=tuple(groups))
        for directory in temp_dirs:
            shutil.rmtree(directory, ignore_errors=True)


def test_sweep_survives_losing_a_worker_node_mid_trial(two_nodes, tiny_llama_dir, tiny_csv, tmp_path):
    tag, out, storage = two_nodes["tag"], tmp_path / "out", tmp_path / "storage"
    log = tmp_path / "driver.log"
    driver = subprocess.Popen(
        _compare_args(tiny_llama_dir, tiny_csv, out, "random", "--address", two_nodes["address"], "--storage-path",
                      str(storage), "--max-concurrent", "2", "--max-failures", "2"),
        env=_env(tag, "driver"), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    two_nodes["groups"].append(driver.pid)
    worker_node = psutil.Process(two_nodes["worker"])

    def trial_on_worker() -> tuple[Path, list[dict]] | None:
        on_worker = {p.pid for p in worker_node.children(recursive=True)}
        for trial_dir in storage.glob("comparison/trainable_*"):
            rows = _results(trial_dir)
            if rows and not rows[-1]["final"] and rows[0]["pid"] in on_worker:
                return trial_dir, rows
        return None

    trial_dir, before = _wait_for(trial_on_worker, 120, "a trial reporting from the worker node", driver, log)
    os.kill(before[0]["pid"], signal.SIGSTOP)  # freeze it mid-trial, then lose the whole node
    _kill(tag, "worker", groups=(two_nodes["worker"],), pids=(before[0]["pid"],))
    assert driver.wait(timeout=150) == 0, log.read_text()[-3000:]

    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2 and (trials.status == "TERMINATED").all() and trials.blocks.nunique() == 2
    rows = _results(trial_dir)
    worker_node = rows[0]["node_id"]
    after = [r for r in rows if r["node_id"] != worker_node]
    assert after, "the interrupted trial never ran again"
    assert not before[-1]["final"] and after[-1]["final"] and after[-1]["step"] == 12
    # resumed from its checkpoint on the head node: it continued where it stopped, not from step 1
    assert after[0]["step"] > 1 and after[0]["step"] <= max(r["step"] for r in rows if r["node_id"] == worker_node) + 1
    first_nodes = {_results(d)[0]["node_id"] for d in storage.glob("comparison/trainable_*")}
    assert len(first_nodes) == 2, "the two trials should have started on different nodes"


def test_killed_driver_resumes_without_losing_or_repeating_trials(tiny_llama_dir, tiny_csv, tmp_path):
    tag, out = uuid.uuid4().hex, tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="ftrd", dir="/tmp")  # the driver's own local Ray: nobody else finds it
    env = _env(tag, "driver", RAY_TMPDIR=ray_tmp)
    args = _compare_args(tiny_llama_dir, tiny_csv, out, "flexora,random,all")
    log = tmp_path / "first.log"
    groups: list[int] = []
    stopped: list[int] = []
    try:
        driver = subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        groups.append(driver.pid)

        trial_dir, before = _wait_for(lambda: _running_trial(out / "ray", "random_seed0"), 150,
                                      "a running random trial", driver, log)
        stopped.append(before[0]["pid"])
        os.kill(stopped[0], signal.SIGSTOP)  # freeze the trial so the driver dies mid-trial
        _kill(tag, groups=tuple(groups), pids=tuple(stopped))  # the driver and its whole local Ray
        driver.wait(timeout=10)
        assert json.loads((out / "finished_experiments.json").read_text()) == []  # the comparison is unfinished
        search_dir = next(d for d in (out / "ray").glob("comparison/trainable_*") if _results(d)
                          and _results(d)[-1]["stage"] == "search")
        assert _results(search_dir)[-1]["final"]  # Flexora's search had finished (it released the random arm)

        resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=200,
                                 start_new_session=True)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "comparison: resuming" in resumed.stdout, resumed.stdout[-3000:]
    finally:
        _kill(tag, groups=tuple(groups), pids=tuple(stopped))
        shutil.rmtree(ray_tmp, ignore_errors=True)

    trials = pd.read_csv(out / "trials.csv")  # exactly the planned trials: search + 2, random 2, all 1
    assert sorted(trials.strategy) == ["all", "flexora", "flexora", "flexora", "random", "random"]
    assert sorted(trials[trials.strategy == "flexora"].stage) == ["finetune", "finetune", "search"]
    assert trials.trial_id.is_unique and (trials.status == "TERMINATED").all()
    assert trials[trials.strategy == "random"].blocks.nunique() == 2  # no subset fine-tuned twice
    assert json.loads((out / "finished_experiments.json").read_text()) == ["comparison"]
    rows = _results(trial_dir)
    pids = list(dict.fromkeys(r["pid"] for r in rows))
    assert len(pids) == 2 and rows[-1]["final"] and rows[-1]["step"] == 12
    restarted = [r for r in rows if r["pid"] == pids[1]]
    assert restarted[0]["step"] > 1  # continued from its checkpoint, not from the start
    assert len(list((out / "ray").glob("comparison/trainable_*"))) == 6  # no trial started twice
    assert len({r["pid"] for r in _results(search_dir)}) == 1  # the finished search was not run again
    assert (out / "summary.csv").exists()


def test_ctrl_c_stops_the_whole_comparison_and_keeps_finished_results(tiny_llama_dir, tiny_csv, tmp_path):
    tag, out = uuid.uuid4().hex, tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="ftrc", dir="/tmp")
    env = _env(tag, "driver", RAY_TMPDIR=ray_tmp)
    log = tmp_path / "driver.log"
    groups: list[int] = []
    try:
        driver = subprocess.Popen(_compare_args(tiny_llama_dir, tiny_csv, out, "flexora,random,all"), env=env,
                                  stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        groups.append(driver.pid)
        _wait_for(lambda: _running_trial(out / "ray", "random_seed0"), 150, "a running random trial", driver, log)
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=60) == 130, log.read_text()[-3000:]
    finally:
        _kill(tag, groups=tuple(groups))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    text = log.read_text()
    assert "interrupted; finished results are kept; continue with --resume" in text
    kept = pd.read_csv(out / "trials.csv")  # what had finished, and only that
    reports = [_results(d) for d in (out / "ray").glob("comparison/trainable_*")]
    finished = {rows[-1]["trial_id"] for rows in reports if rows and rows[-1]["final"]}
    assert "search" in set(kept.stage) and (kept.status == "TERMINATED").all() and len(kept) < 6
    assert set(kept.trial_id) <= finished
    assert "comparison" not in json.loads((out / "finished_experiments.json").read_text())


@pytest.mark.slow
def test_trial_killed_twice_finishes_after_resume(tiny_llama_dir, tiny_csv, tmp_path):
    """Spot instances: a trial pre-empted more often than --max-failures allows ends ERROR; `--resume` retries
    it from its last checkpoint (not from the start) and the sweep ends with every trial finished."""
    tag, out = uuid.uuid4().hex, tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="ftrk", dir="/tmp")
    env = _env(tag, "driver", RAY_TMPDIR=ray_tmp)
    args = _compare_args(tiny_llama_dir, tiny_csv, out, "random", "--max-steps", "40", "--max-failures", "1",
                         "--max-concurrent", "1")
    log = tmp_path / "first.log"
    groups: list[int] = []
    killed: list[int] = []
    try:
        driver = subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        groups.append(driver.pid)

        def running_trial(trial_dir: Path | None = None) -> tuple[Path, int] | None:
            """A trial (the given one) reporting from a process not killed yet, mid-way: (its dir, its pid)."""
            dirs = [trial_dir] if trial_dir else sorted((out / "ray").glob("comparison/trainable_*"))
            for directory in dirs:
                rows = [r for r in _results(directory) if r["pid"] not in killed]
                if rows and not rows[-1]["final"] and rows[-1]["step"] < rows[-1]["total_steps"] - 5:
                    return directory, rows[-1]["pid"]
            return None

        trial_dir, pid = _wait_for(running_trial, 150, "a running random trial", driver, log)
        for attempt in range(2):  # pre-empted twice: the retry allowed by --max-failures 1, then once more
            if attempt:
                _, pid = _wait_for(lambda: running_trial(trial_dir), 120, "the retried trial", driver, log)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        assert driver.wait(timeout=150) == 0, log.read_text()[-3000:]
        first = pd.read_csv(out / "trials.csv")
        assert sorted(first.status) == ["ERROR", "TERMINATED"], first[["trial_id", "status", "error"]]

        resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=200,
                                 start_new_session=True)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "comparison: resuming" in resumed.stdout, resumed.stdout[-3000:]
    finally:
        _kill(tag, groups=tuple(groups), pids=tuple(killed))
        shutil.rmtree(ray_tmp, ignore_errors=True)

    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2 and (trials.status == "TERMINATED").all() and trials.trial_id.is_unique
    assert trials.blocks.nunique() == 2  # the retried trial kept its subset; nothing was proposed twice
    rows = _results(trial_dir)
    pids = list(dict.fromkeys(r["pid"] for r in rows))
    assert pids[:2] == killed and len(pids) == 3, (pids, killed)
    assert rows[-1]["final"] and rows[-1]["step"] == rows[-1]["total_steps"] > 12
    last_run = [r for r in rows if r["pid"] == pids[2]]
    assert last_run[0]["step"] > 1  # the resumed run continued from its checkpoint, not from step 1
