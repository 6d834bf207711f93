"""Driver-side client for the PyTorch peer (standard library only: no torch here).

The project runs on Python 3.12 without torch; the peer (peer.py) runs in its own
Python 3.11 venv with torch 2.13.0 (see README.md). This module starts it and talks
to it over JSON lines, so a JAX benchmark can interleave measurements:

  from benchmarks.torch_peer.client import TorchPeer, find_or_create_venv

  with TorchPeer(find_or_create_venv()) as peer:
    peer.setup(batch=128, dtype="float32", threads=2)
    for _ in range(3):
      jax_ips = measure_jax()                      # A
      torch_ips = peer.train(steps=5)["images_per_s"]  # B

Smoke test from the command line: python benchmarks/torch_peer/client.py
"""

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
PEER_SCRIPT = HERE / "peer.py"
SETUP_SCRIPT = HERE / "setup_venv.sh"


class PeerError(RuntimeError):
  """The peer answered {"ok": false, ...}, died, or broke the protocol."""


def find_or_create_venv(setup_timeout: float = 900.0) -> str:
  """Returns the path of a python that can run peer.py.

  TORCH_PEER_PYTHON wins when set (e.g. a machine whose system Python already has
  torch). Otherwise runs setup_venv.sh, which returns at once when .venv-torch/ is
  up to date and creates/installs it when not. Raises PeerError with the script's
  message (e.g. "Python 3.11 not found") on failure.
  """
  override = os.environ.get("TORCH_PEER_PYTHON")
  if override:
    if not (os.path.isfile(override) and os.access(override, os.X_OK)):
      raise PeerError(f"TORCH_PEER_PYTHON={override!r} is not an executable file")
    return override
  try:
    proc = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True,
                          timeout=setup_timeout, env=_clean_env())
  except subprocess.TimeoutExpired as e:
    raise PeerError(f"{SETUP_SCRIPT} took over {setup_timeout:.0f}s") from e
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    raise PeerError(
        f"could not create the PyTorch peer's venv ({SETUP_SCRIPT} exited "
        f"{proc.returncode}):\n{proc.stderr.strip()[-3000:]}")
  python = lines[-1].strip()
  if not os.access(python, os.X_OK):
    raise PeerError(f"{SETUP_SCRIPT} printed {python!r}, which is not executable")
  return python


def _clean_env(extra: dict | None = None) -> dict:
  # The driver runs in the project's 3.12 venv; its PYTHONPATH/PYTHONHOME/VIRTUAL_ENV
  # would make the 3.11 interpreter import 3.12 packages (or the wrong stdlib).
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
  env["PYTHONUNBUFFERED"] = "1"
  env.update(extra or {})
  return env


class TorchPeer:
  """A running peer.py worker. Use as a context manager (or call close()).

  Every method sends one command and returns the reply dict; an {"ok": false} reply
  raises PeerError (the worker stays usable). A reply that doesn't come within the
  timeout raises TimeoutError and kills the worker, since its state is then unknown.

  malloc: "tuned" (default) keeps big tensors on glibc's heap instead of a fresh mmap
  per allocation, about 2x faster batch-128 steps here; "glibc" = stock behaviour,
  what a plain `python train.py` gets (see peer.py).

  stderr: where the worker's logs go (None = inherit this process's stderr; or an
  open file / subprocess.DEVNULL). Never subprocess.PIPE: nothing would drain it.
  """

  def __init__(self, python: str | None = None, *, timeout: float = 900.0,
               start_timeout: float = 180.0, stderr=None, env: dict | None = None,
               malloc: str = "tuned"):
    if stderr is subprocess.PIPE:
      raise ValueError("stderr=PIPE would deadlock once the pipe fills; use a file")
    self.python = python or find_or_create_venv()
    self.timeout = timeout
    self._next_id = 0
    self._lines: queue.Queue = queue.Queue()
    self.proc = subprocess.Popen(
        [self.python, str(PEER_SCRIPT), f"--malloc={malloc}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
        text=True, bufsize=1, env=_clean_env(env), cwd=str(REPO_ROOT))
    # A reader thread turns the blocking pipe into a queue, so reads can time out.
    self._reader = threading.Thread(target=self._read_stdout, daemon=True)
    self._reader.start()
    try:
      self.ready = self._receive(start_timeout, want_id=None)
    except BaseException:
      self._kill()
      raise
    if self.ready.get("event") != "ready":
      self._kill()
      raise PeerError(f"expected the worker's ready line, got {self.ready}")
    if not self.ready.get("ok"):
      self.close()
      raise PeerError(f"peer failed to start: {self.ready.get('error')}")

  # ---------------------------------------------------------------- plumbing
  def _read_stdout(self):
    for line in self.proc.stdout:
      self._lines.put(line)
    self._lines.put(None)  # EOF: the worker exited

  def _receive(self, timeout: float, want_id) -> dict:
    deadline = time.monotonic() + timeout
    while True:
      left = deadline - time.monotonic()
      try:
        line = self._lines.get(timeout=max(left, 0.0))
      except queue.Empty:
        self._kill()
        raise TimeoutError(f"no reply from the PyTorch peer within {timeout:.0f}s "
                           "(worker killed)") from None
      if line is None:
        rc = self.proc.wait(timeout=10)
        raise PeerError(f"the PyTorch peer exited (code {rc}) without replying; "
                        "see its stderr")
      try:
        msg = json.loads(line)
      except json.JSONDecodeError:
        print(f"[TorchPeer] ignoring non-JSON line: {line.rstrip()}", file=sys.stderr)
        continue
      if want_id is None or msg.get("id") == want_id:
        return msg
      # A reply to an earlier request (can't normally happen): skip it.

  def _kill(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait(timeout=10)

  # ---------------------------------------------------------------- commands
  def request(self, cmd: str, timeout: float | None = None, **fields) -> dict:
    """Sends {"cmd": cmd, **fields}; returns the reply or raises PeerError."""
    if self.proc.poll() is not None:
      raise PeerError(f"the PyTorch peer is not running (exit code {self.proc.returncode})")
    self._next_id += 1
    msg = {"cmd": cmd, "id": self._next_id, **fields}
    try:
      self.proc.stdin.write(json.dumps(msg) + "\n")
      self.proc.stdin.flush()
    except BrokenPipeError as e:
      raise PeerError("the PyTorch peer closed its input (it died?)") from e
    out = self._receive(self.timeout if timeout is None else timeout, self._next_id)
    if not out.get("ok"):
      raise PeerError(f"peer {cmd} failed: {out.get('error')}")
    return out

  def setup(self, batch: int = 128, dtype: str = "float32", threads: int | None = None,
            num_classes: int = 1000, **extra) -> dict:
    fields = dict(batch=batch, dtype=dtype, num_classes=num_classes, **extra)
    if threads is not None:
      fields["threads"] = threads
    return self.request("setup", **fields)

  def train(self, steps: int, **extra) -> dict:
    return self.request("train", steps=steps, **extra)

  def eval(self, steps: int, ten_crop: bool = True, **extra) -> dict:
    return self.request("eval", steps=steps, ten_crop=ten_crop, **extra)

  def info(self) -> dict:
    return self.request("info", timeout=60)

  def peak_memory(self) -> dict:
    return self.request("peak_memory", timeout=60)

  def close(self, timeout: float = 30.0) -> None:
    """Asks the worker to quit; kills it if it doesn't within `timeout`."""
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.proc.stdin.flush()
        self.proc.stdin.close()
        self.proc.wait(timeout=timeout)
      except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
        self._kill()
    self._reader.join(timeout=5)
    for f in (self.proc.stdin, self.proc.stdout):
      try:
        f.close()
      except OSError:
        pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False


def _smoke(argv: list[str]) -> int:
  """The end-to-end check: small train/eval, then batch 128 in float32 and bfloat16."""
  import argparse

  p = argparse.ArgumentParser(description=_smoke.__doc__)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--malloc", default="tuned", choices=("tuned", "glibc"))
  a = p.parse_args(argv)

  def show(tag, r):
    keep = {k: v for k, v in r.items() if k not in ("ok", "id")}
    if "step_s" in keep:
      keep["step_s"] = [round(s, 3) for s in keep["step_s"]]
    print(f"{tag}: {json.dumps(keep)}", flush=True)

  with TorchPeer(find_or_create_venv(), malloc=a.malloc) as peer:
    show("ready", peer.ready)
    show("info", peer.info())
    show("setup b32 fp32", peer.setup(batch=32, dtype="float32", threads=a.threads))
    show("train b32 fp32", peer.train(a.steps))
    show("eval b32 fp32 10-crop", peer.eval(2, ten_crop=True))
    show("setup b128 fp32", peer.setup(batch=128, dtype="float32", threads=a.threads))
    show("train b128 fp32", peer.train(a.steps))
    show("setup b128 bf16", peer.setup(batch=128, dtype="bfloat16", threads=a.threads))
    show("train b128 bf16", peer.train(a.steps))
    try:
      peer.request("train", steps="x")
    except PeerError as e:
      print(f"error path ok: {e}")
    show("info", peer.info())
    show("peak_memory", peer.peak_memory())
  return 0


if __name__ == "__main__":
  sys.exit(_smoke(sys.argv[1:]))
