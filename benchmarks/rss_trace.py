r"""Resident memory of a command over its run: is it flat, or does it grow?

  python benchmarks/rss_trace.py --out=rss.csv -- \
      python main.py --workdir=/tmp/rss_demo --config=experiments/demo.py \
      --config.num_train_steps=1000 --config.log_every_steps=50

Samples the RSS of the command's whole process tree (/proc) every --every seconds into a
CSV (seconds, rss_mb, the last "step N/" the command printed), and prints the peak and the
RSS at each tenth of the steps, so growth over a long run shows as a trend, not a peak.
Linux only (reads /proc). A benchmark, not a test: its numbers go to the README.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import threading
import time

STEP = re.compile(r"step (\d+)/")


def tree_rss_bytes(pid: int) -> int:
  """RSS of `pid` and all its descendants."""
  children: dict[int, list[int]] = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
      continue
    children.setdefault(ppid, []).append(int(entry))
  total, todo = 0, [pid]
  while todo:
    p = todo.pop()
    todo.extend(children.get(p, []))
    try:
      with open(f"/proc/{p}/status") as f:
        for line in f:
          if line.startswith("VmRSS:"):
            total += int(line.split()[1]) * 1024
    except OSError:
      pass
  return total


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="CSV of (seconds, rss_mb, step)")
  parser.add_argument("--every", type=float, default=2.0, help="seconds between samples")
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  last_step = [0]

  def read_output():
    for line in proc.stdout:
      sys.stdout.write(line)
      m = STEP.search(line)
      if m:
        last_step[0] = int(m.group(1))

  reader = threading.Thread(target=read_output, daemon=True)
  reader.start()
  start, rows = time.time(), []
  while proc.poll() is None:
    rows.append((round(time.time() - start, 1), tree_rss_bytes(proc.pid) / 2**20, last_step[0]))
    time.sleep(args.every)
  reader.join()
  with open(args.out, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["seconds", "rss_mb", "step"])
    writer.writerows((s, f"{r:.1f}", st) for s, r, st in rows)
  peak = max((r for _, r, _ in rows), default=0.0)
  print(f"exit {proc.returncode}; {len(rows)} samples; peak RSS {peak:.0f} MB")
  steps = max((st for _, _, st in rows), default=0)
  if steps:
    print("step -> RSS (MB), the last sample at or before each tenth of the steps:")
    for tenth in range(1, 11):
      target = steps * tenth // 10
      at = [r for _, r, st in rows if 0 < st <= target]
      if at:
        print(f"  {target:6d}  {at[-1]:8.0f}")
  return proc.returncode


if __name__ == "__main__":
  sys.exit(main())
