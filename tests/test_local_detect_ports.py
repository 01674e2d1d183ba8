"""How the local launcher's detector finds its pod leaders' endpoints (found on CI: a port the launcher picked
in advance was taken by another socket before the rank bound it, and the run died with EADDRINUSE). Leaders
now bind a free port themselves and name it in a file; the detector reads the file once it is there."""

from __future__ import annotations

import os

from loco_contract.config import RuntimeEnv, TrainerConfig
from loco_contract.detection import DetectorConfig
from loco_contract.protocol import ProgressReport, WorkerState
from loco_trainer.launcher import LaunchOptions, _detector_ports, _write_atomically
from loco_trainer.local_detect import LocalDetection
from loco_trainer.progress import ProgressServer, ProgressState


def options(status_port: int | None = None, pods: int = 3) -> LaunchOptions:
    config = TrainerConfig.model_validate({"jobName": "j", "namespace": "n", "model": {"gpt": {"nLayer": 1}}})
    return LaunchOptions("c.yaml", config, RuntimeEnv(status_port=0), status_port=status_port, local_pods=pods,
                         detector=DetectorConfig())


def test_no_pod_gets_a_port_picked_in_advance_each_names_its_own_in_a_file(tmp_path):
    ports = _detector_ports(options(), str(tmp_path))
    assert ports == {pod: (0, os.path.join(tmp_path, f"status-port-{pod}")) for pod in range(3)}


def test_a_port_the_user_named_stays_pod_0s_and_minus_one_switches_detection_off(tmp_path):
    assert _detector_ports(options(9123), str(tmp_path))[0][0] == 9123
    assert [port for port, _ in _detector_ports(options(9123), str(tmp_path)).values()][1:] == [0, 0]
    assert _detector_ports(options(-1), str(tmp_path)) == {}
    assert _detector_ports(options(pods=1), str(tmp_path)) == {}


def test_the_detector_hears_a_pod_once_its_port_file_is_written(tmp_path):
    state = ProgressState(ProgressReport(job_name="j", namespace="n", replica_index=0, epoch=0,
                                         state=WorkerState.running, total_steps=10, algorithm="ddp"))
    server = ProgressServer(state, lambda: b"", "127.0.0.1", 0).start()
    try:
        port_file = str(tmp_path / "status-port-0")
        detection = LocalDetection({0: port_file}, DetectorConfig())
        detection.poll_once(now_s=100.0)
        assert detection._heard == {}  # not listening yet: silence, not an error
        _write_atomically(port_file, str(server.port))
        assert not os.path.exists(port_file + ".partial")
        detection.poll_once(now_s=101.0)
        assert detection._heard == {0: 101.0}
        assert detection.ports == {0: server.port}  # read once, then kept
    finally:
        server.stop()
