"""utils/launch.py: torchrun's environment, rank-named messages, torchrun's error file."""
import json

import pytest

from utils.errors import ConfigError, DataError
from utils.launch import (Launch, distributed_run, launch, leave_if_distributed, rank_prefix, record_error)

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_ERROR_FILE")


@pytest.fixture
def env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_plain_process_is_rank_0_of_1(env):
    assert launch() == Launch(0, 1, 0, 1)
    assert not distributed_run() and rank_prefix() == ""
    assert leave_if_distributed(2) == 2                     # a plain run returns the code, it does not exit


def test_torchrun_environment(env):
    for name, value in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2").items():
        env.setenv(name, value)
    assert launch() == Launch(3, 4, 1, 2) and launch().distributed
    assert rank_prefix() == "rank 3 of 4: "
    env.setenv("WORLD_SIZE", "1")
    env.setenv("RANK", "0")
    assert not distributed_run()                             # torchrun --nproc_per_node 1 is a plain run


@pytest.mark.parametrize("values, fragment", [(dict(WORLD_SIZE="two"), "WORLD_SIZE='two' is not an integer"),
                                              (dict(WORLD_SIZE="2", RANK="2"), "RANK=2 WORLD_SIZE=2")])
def test_malformed_environment_is_a_clear_error(env, values, fragment):
    for name, value in values.items():
        env.setenv(name, value)
    with pytest.raises(ConfigError, match="torchrun") as info:
        launch()
    assert fragment in str(info.value)
    assert rank_prefix() == "" and not distributed_run()    # messages still print


def test_error_file_holds_the_message(env, tmp_path):
    path = tmp_path / "error.json"
    record_error(DataError("x.npz: file not found"))        # no error file named: nothing written
    assert not path.exists()
    env.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    env.setenv("WORLD_SIZE", "2")
    env.setenv("RANK", "1")
    record_error(DataError("x.npz: file not found"), traceback_too=False)
    data = json.loads(path.read_text())["message"]
    assert data["message"] == "rank 1 of 2: DataError: x.npz: file not found"
    assert data["extraInfo"]["py_callstack"] == data["message"] and data["extraInfo"]["timestamp"].isdigit()
    try:
        raise ValueError("boom")
    except ValueError as exc:
        record_error(exc)
    stack = json.loads(path.read_text())["message"]["extraInfo"]["py_callstack"]
    assert stack.startswith("Traceback (most recent call last)") and "ValueError: boom" in stack
