"""--mode=predict launched as several jax.distributed processes is refused in one line."""

import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_predict_in_two_processes_is_refused(tmp_path):
  # Unguarded, each process printed the whole output (two copies) on a mesh whose data
  # axis stays in one process, and crashed fetching the predictions on one across them.
  # The refusal comes before the workdir is read, so none is needed here.
  workdir = tmp_path / "run"
  image = tmp_path / "a.png"
  image.write_bytes(b"")
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}", "--mode=predict",
       f"--config={ROOT}/experiments/alexnet.py:smoke", f"--images={image}",
       f"--config.dataset.cache_dir={tmp_path / 'cache'}",  # were the guard gone
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs, strict=True):
    assert p.returncode == 2, err[-3000:]
    assert out == "" and "Traceback" not in err, err[-3000:]
    assert "error: --mode=predict runs in one process, not 2" in err, err[-3000:]
  assert not workdir.exists()
