"""``train.cpu_threads: auto``: a CPU training trains on the cores other processes leave free."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from router.policy import TrainPolicy
from tests.trainer.conftest import intent_records
from trainer.cpu_share import CpuShare, machine_busy_s
from trainer.dataset import DatasetOptions, select_examples
from trainer.finetune import FinetuneConfig, finetune

pytestmark = pytest.mark.skipif(machine_busy_s() is None, reason="needs /proc/stat (Linux)")

BUSY_LOOP = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass\n"


@pytest.fixture
def busy_core() -> Iterator[subprocess.Popen[bytes]]:
    """Another process keeping one core busy."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def threads_back() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_all_cores_while_idle_one_fewer_while_another_process_keeps_one_busy(
    busy_core: subprocess.Popen[bytes], threads_back: None
) -> None:
    share = CpuShare(cores=2)
    time.sleep(1.0)
    others = share.others_cores()
    assert others is not None and 0.8 < others < 1.3
    time.sleep(1.0)
    assert share.pick() == 1 and torch.get_num_threads() == 1
    busy_core.kill()
    busy_core.wait()
    share.others_cores()  # the interval the busy process died in
    time.sleep(1.0)
    assert share.pick() == 2 and torch.get_num_threads() == 2
    assert share.changes == 2


def test_this_process_own_work_does_not_count_as_others(threads_back: None) -> None:
    share = CpuShare(cores=2)
    end = time.monotonic() + 1.0
    while time.monotonic() < end:  # this process busy on a core
        pass
    assert share.pick() == 2


def test_a_training_with_auto_threads_steps_down_under_load_and_gives_the_count_back(
    tiny_model: Path, busy_core: subprocess.Popen[bytes], tmp_path: Path, threads_back: None
) -> None:
    torch.set_num_threads(2)
    selection = select_examples(intent_records("intent", 40), DatasetOptions(holdout=0.1))
    config = FinetuneConfig.from_policy(
        TrainPolicy(cpu_threads="auto", batch_tokens=256, max_seq_len=256), max_steps=4, lora_dropout=0.0
    )
    assert config.cpu_threads == "auto"
    seen: list[int] = []
    result = finetune(
        tiny_model,
        selection.train,
        selection.holdout,
        tmp_path / "auto",
        config,
        progress=lambda _: seen.append(torch.get_num_threads()),
    )
    assert result.steps == 4 and len(seen) == 4
    # A core was busy all along: from the first step on, the run left it to that process.
    assert set(seen) == {1}, seen
    assert torch.get_num_threads() == 2
