"""Two nodes on one machine: two torchrun launches of one CPU process each over gloo on 127.0.0.1.

Run against the same seed on 2-process single-node DDP (``trainer=ddp_cpu``), which must give the
same run bit for bit: the two setups differ only in who starts the processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from test_cli import SCRIPT

from robust_lightning.cli import launcher_arguments

TORCHRUN = Path(sys.executable).parent / "torchrun"
TESTS = Path(__file__).parent
# Filter rounds and drift tests within 4 epochs; ELR's per-sample targets; 32 samples per process.
SHORT = [
    "trainer.max_epochs=4",
    "trainer.enable_progress_bar=false",
    "filter.poison_filter.start_epoch=1",
    "filter.poison_filter.every_n_epochs=2",
    "callbacks.drift_monitor.every_n_epochs=2",
    "data.batch_size=32",
    "loss=elr",
]
KILL = "+callbacks.kill={_target_: helpers.KillAtEpoch, epoch: 2}"
# The tests' helpers importable in the workers; one thread each, as Lightning gives each of DDP's
# two processes on two cores, so that both setups compute alike; no SLURM job around the torchruns.
ENV = {
    **{key: value for key, value in os.environ.items() if not key.startswith("SLURM_")},
    "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
    "OMP_NUM_THREADS": "1",
}


class HangAtEpoch(Callback):
    """Stops its own process (SIGSTOP) as epoch ``epoch`` starts, its sockets open: a node that stops answering.

    Writes its process id to ``pid_file`` first, for the test to kill it.
    """

    def __init__(self, epoch: int, pid_file: str):
        self.epoch, self.pid_file = epoch, pid_file

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            Path(self.pid_file).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)


def dump(folder: Path) -> str:
    """The override that writes each rank's mask, ELR targets, flags, metric and drift histories into ``folder``."""
    return f"+callbacks.dump={{_target_: test_end_to_end.DumpState, folder: '{folder}'}}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_nodes(*args: str, cwd: Path, rdzv_id: str | None, node1: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    """torchrun on node 0 and node 1, each with ``args`` (node 1 with ``node1`` too); output in cwd/node{N}.*."""
    cwd.mkdir(parents=True, exist_ok=True)
    torchrun = [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1"]
    torchrun += ["--master-port", str(free_port()), *(["--rdzv-id", rdzv_id] if rdzv_id else [])]
    command = ["--no-python", SCRIPT, "trainer=multinode", "trainer.accelerator=cpu", *args]
    nodes = []
    for node in (0, 1):
        with (cwd / f"node{node}.out").open("w") as out, (cwd / f"node{node}.err").open("w") as err:
            line = [*torchrun, "--node-rank", str(node), *command, *(node1 if node else ())]
            nodes.append(subprocess.Popen(line, cwd=cwd, env=ENV, stdout=out, stderr=err))
    return nodes


def wait_for(nodes: list[subprocess.Popen], limit: float = 300) -> list[float]:
    """The time at which each node ended; kills both and fails past ``limit`` seconds."""
    ended: list[float | None] = [None, None]
    deadline = time.monotonic() + limit
    while None in ended and time.monotonic() < deadline:
        ended = [end or (time.monotonic() if node.poll() is not None else None) for node, end in zip(nodes, ended)]
        time.sleep(0.2)
    if None in ended:
        for node in nodes:
            node.kill()
        pytest.fail(f"the nodes were still running after {limit} s")
    return ended


def output(cwd: Path, node: int) -> str:
    return (cwd / f"node{node}.out").read_text() + (cwd / f"node{node}.err").read_text()


def run_two_nodes(*args: str, cwd: Path, rdzv_id: str) -> None:
    nodes = start_nodes(*args, cwd=cwd, rdzv_id=rdzv_id)
    wait_for(nodes)
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(output(cwd, node)[-3000:] for node in (0, 1))


def excluded(folder: Path) -> torch.Tensor:
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["RobustDataModule"]["excluded"]


def states(folder: Path) -> list[dict]:
    return [json.loads((folder / f"state{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The default recipe with ELR, seed 0, on 2-process single-node DDP and on two nodes (rendezvous id ``two``)."""
    root = tmp_path_factory.mktemp("multinode")
    (root / "single_states").mkdir()
    (root / "node_states").mkdir()
    single = subprocess.run(
        [SCRIPT, "trainer=ddp_cpu", *SHORT, dump(root / "single_states"), f"hydra.run.dir={root / 'single'}"],
        cwd=root,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    run_two_nodes(*SHORT, dump(root / "node_states"), cwd=root / "nodes", rdzv_id="two")
    return {"root": root, "single": root / "single", "nodes": root / "nodes" / "runs" / "two"}


@pytest.mark.slow
def test_two_nodes_give_the_run_of_two_processes_on_one_machine(runs):
    single, nodes = runs["single"], runs["nodes"]
    results = json.loads((nodes / "results.json").read_text())
    assert results == json.loads((single / "results.json").read_text()), "every test metric, exactly"
    assert (nodes / "flagged.csv").read_text() == (single / "flagged.csv").read_text()
    mask = excluded(nodes)
    assert torch.equal(mask, excluded(single)) and mask.sum() > 100, "the same samples excluded"
    rank0, rank1 = states(runs["root"] / "node_states")
    assert rank0 == rank1, "identical mask, ELR targets, filter rounds, synced metrics and drift results on both nodes"
    assert [rank0, rank1] == states(runs["root"] / "single_states")
    assert rank0["rounds"] and rank0["drift"], "the filter and the drift monitor ran"


@pytest.mark.slow
def test_both_nodes_write_into_one_run_folder_named_by_the_rendezvous_id(runs):
    nodes, single = runs["nodes"], runs["single"]
    assert [p.name for p in nodes.parent.iterdir()] == ["two"], "one run folder for both nodes"
    files = {p.name for p in nodes.iterdir()}
    assert files - {"rank_1.log"} == {p.name for p in single.iterdir()} - {"train_ddp_process_1.log"}
    assert {p.name for p in (nodes / "checkpoints").iterdir()} == {"epoch=3-step=72.ckpt", "last.ckpt"}
    node0, node1 = (output(nodes.parent.parent, node) for node in (0, 1))
    assert "Test results per class (%)" in node0 and "Test results per class (%)" not in node1, "rank 0 reports"
    assert f"Run folder: {nodes.resolve()}" in node0


@pytest.mark.slow
def test_without_a_job_id_or_a_run_folder_the_nodes_refuse_to_start(tmp_path):
    nodes = start_nodes("trainer.max_epochs=1", cwd=tmp_path, rdzv_id=None)
    wait_for(nodes)
    assert [node.returncode for node in nodes] == [1, 1]
    assert "Start every node with the same --rdzv-id=NAME" in output(tmp_path, 0)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_node_killed_mid_run_fails_the_other_and_two_nodes_resume_the_run(runs, tmp_path):
    nodes = start_nodes(*SHORT, cwd=tmp_path, rdzv_id="killed", node1=(KILL,))
    node0_end, node1_end = wait_for(nodes)
    assert nodes[1].returncode != 0 and "Signal 9 (SIGKILL)" in output(tmp_path, 1)
    assert nodes[0].returncode != 0 and node0_end - node1_end < 120, f"node 0 ended {node0_end - node1_end:.0f} s after"
    assert "Connection reset by peer" in output(tmp_path, 0) or "Connection closed by peer" in output(tmp_path, 0)
    folder = tmp_path / "runs" / "killed"
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1

    run_two_nodes("ckpt_path=last", cwd=tmp_path, rdzv_id="killed")
    whole = runs["nodes"]
    assert json.loads((folder / "results.json").read_text()) == json.loads((whole / "results.json").read_text())
    assert (folder / "flagged.csv").read_text() == (whole / "flagged.csv").read_text()
    assert (folder / "metrics.csv").read_text() == (whole / "metrics.csv").read_text(), "the same rows, in order"
    assert {p.name for p in (folder / "checkpoints").iterdir()} == {"epoch=3-step=72.ckpt", "last.ckpt"}


@pytest.mark.slow
def test_a_node_that_stops_answering_fails_the_other_after_the_collective_timeout(tmp_path):
    pid = tmp_path / "pid"
    hang = f"+callbacks.hang={{_target_: test_multinode.HangAtEpoch, epoch: 1, pid_file: '{pid}'}}"
    args = ["trainer.enable_progress_bar=false", "data.batch_size=32", "trainer.strategy.timeout.seconds=20"]
    nodes = start_nodes(*args, cwd=tmp_path, rdzv_id="hung", node1=(hang,))
    try:
        nodes[0].wait(timeout=180)
        waited = time.time() - pid.stat().st_mtime
    finally:
        if pid.exists():  # the stopped process: its torchrun then ends too
            os.kill(int(pid.read_text()), signal.SIGKILL)
        for node in nodes:
            node.kill()
            node.wait(timeout=60)
    assert nodes[0].returncode != 0 and "Application timeout caused pair closure" in output(tmp_path, 0)
    assert 20 <= waited < 60, f"node 0 ended {waited:.0f} s after node 1 stopped"


def test_processes_of_a_launcher_agree_on_the_job_id_folder_and_rank_0_writes_hydras_files():
    argv = ["robust-lightning", "trainer=multinode"]
    slurm = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    assert launcher_arguments(argv, slurm) == [
        *argv,
        "hydra.run.dir=runs/slurm-7",
        "hydra.output_subdir=null",
        "hydra.job.name=rank_1",
    ]
    torchrun = {"TORCHELASTIC_RUN_ID": "exp1", "RANK": "0", "WORLD_SIZE": "8"}
    assert launcher_arguments(argv, torchrun) == [*argv, "hydra.run.dir=runs/exp1"]
    named = [*argv, "hydra.run.dir=/shared/runs/a"]
    assert launcher_arguments(named, {**torchrun, "TORCHELASTIC_RUN_ID": "none"}) == named
    assert launcher_arguments(argv, {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "1"}) == argv, "one process"
    with pytest.raises(SystemExit, match="--rdzv-id=NAME"):
        launcher_arguments(argv, {**torchrun, "TORCHELASTIC_RUN_ID": "none"})
