"""The trainer ends with a documented exit code per cause (loco_contract.exits), which the operator's failure policy
matches on (issue 24 #3): a configuration error is 2, a non-finite loss 80, and so on."""

from __future__ import annotations

import pytest
import torch

from loco_contract.exits import ExitCode, describe
from loco_trainer.data import DataError
from loco_trainer.failures import ConfigError, NonFiniteLoss, configuration_errors, exit_code_for
from loco_trainer.rendezvous import RendezvousError
from loco_trainer.waits import CommInterrupted

from test_trainer_multiproc import tiny_config, train, write_config

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(180)]


@pytest.mark.parametrize("exc, code", [
    (ConfigError("model.gpt.vocabSize"), ExitCode.CONFIG),
    (DataError("no such file"), ExitCode.DATA),
    (NonFiniteLoss(3, float("nan")), ExitCode.NON_FINITE_LOSS),
    (MemoryError(), ExitCode.OUT_OF_MEMORY),
    (torch.OutOfMemoryError("CUDA out of memory"), ExitCode.OUT_OF_MEMORY),
    (RendezvousError("rank 1 never came"), ExitCode.PEER_LOST),
    (CommInterrupted("interrupted"), ExitCode.PEER_LOST),
    (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242"), ExitCode.PEER_LOST),
    (RuntimeError("something else broke"), ExitCode.ERROR),
    (KeyError("x"), ExitCode.ERROR),
])
def test_each_cause_has_its_exit_code(exc, code):
    assert exit_code_for(exc) is code


def test_a_value_the_run_cannot_be_built_with_is_a_configuration_error_but_a_data_error_stays_one():
    with pytest.raises(ConfigError, match="syncEvery"):
        with configuration_errors():
            raise ValueError("syncEvery (7) must be a multiple of fragments (2)")
    with pytest.raises(DataError):
        with configuration_errors():
            raise DataError("data.path: no such file")


def test_codes_read_as_words():
    assert (describe(2), describe(80), describe(137), describe(7)) == (
        "configuration error", "non-finite loss", "signal 9", "exit code 7")


def test_a_model_the_data_does_not_fit_exits_2_saying_so(tmp_path):
    cfg = tiny_config(tmp_path, {"name": "ddp"})
    cfg["model"]["gpt"]["vocabSize"] = 100  # the built-in data holds bytes up to 255
    result = train(write_config(tmp_path, cfg), "--status-port", "-1")
    assert result.returncode == ExitCode.CONFIG, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout + result.stderr
    assert "configuration error" in out and "model.gpt.vocabSize is 100" in out, out[-2000:]


def test_a_loss_that_blows_up_exits_80_naming_the_step(tmp_path):
    cfg = {**tiny_config(tmp_path, {"name": "ddp"}), "faultInjection": {"nanLossAtStep": 5}}
    result = train(write_config(tmp_path, cfg), "--status-port", "-1")
    assert result.returncode == ExitCode.NON_FINITE_LOSS, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout + result.stderr
    assert "non-finite loss" in out and "the training loss is nan at step 6" in out, out[-2000:]
