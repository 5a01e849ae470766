"""What this torch leaves behind when a CUDA graph capture fails: run in a process of its own
(benchmarks/gpu_check.py does), since the answer may be a process that cannot go on.

    python benchmarks/capture_probe.py          # on a CUDA GPU; prints one line of JSON
    python benchmarks/capture_probe.py --dry    # the same calls on the fake CUDA device, failing as
                                                # torch 2.11 and older do (hw2/fast/fake_cuda.py)

It captures a few kernels with a value read on the host among them, as an edited layer might,
and reports the error the capture ended with, the error inside it (the first's __context__,
what hw2.fast.cuda.cause() names), and then each of hw2/fast/cuda.py's recovery checks: a
synchronization, a random draw from the default generator, emptying the allocator's cache, a
new capture that replays right, and kernels on the default stream.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hw2.fast import cuda  # noqa: E402
from hw2.fast.fake_cuda import FakeCuda  # noqa: E402


def host_read_inside(device):
    """What the capture records: a few kernels, and a read of one value on the host."""
    x = torch.ones(16, device=device)
    y = x * 2
    y.sum().item()
    return y


def probe(device):
    calls = cuda.calls()
    found = {"torch": torch.__version__}
    try:
        calls.capture(lambda: host_read_inside(device), device)
        found["capture"] = "succeeded: the read was not refused"
    except Exception as e:  # noqa: BLE001 - what it raises is the finding
        found["capture"] = f"{type(e).__name__}: {e}"
        inner = e.__context__
        found["inside"] = f"{type(inner).__name__}: {inner}" if inner is not None else None
        found["cause"] = cuda.cause(e)
    found["after"] = calls.recovery(device, every=True)
    found["recovered"] = not any(found["after"].values())
    return found


def in_a_process(dry):
    """(lines, ok, found) for benchmarks/gpu_check.py: this script run in a process of its own."""
    proc = subprocess.run([sys.executable, __file__, *(["--dry"] if dry else [])], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode:
        return [f"the probe failed (exit {proc.returncode}): {proc.stderr[-1500:]}"], False, {}
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = [f"a capture with a value read on the host: {found.get('capture')}",
             f"  the error inside it (__context__): {found.get('inside')}",
             f"  what a run names: {found.get('cause')}"]
    lines += [f"after it, {what}: {'works' if error is None else error}" for what, error in found["after"].items()]
    lines.append(f"recovered: {'yes' if found['recovered'] else 'NO: a failed capture ends a run on this torch'}")
    return lines, "capture" in found, found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="on the CPU, through a fake device failing as torch 2.11")
    args = parser.parse_args(argv)
    if args.dry:
        with cuda.use(FakeCuda(recovers=False)):
            print(json.dumps(probe(torch.device("cpu"))))
        return 0
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA GPU here"}))
        return 2
    print(json.dumps(probe(torch.device("cuda"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
