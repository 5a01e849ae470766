"""What the compiled attention kernel (hw2/fast/kernel.py) buys a sampling pass on this CPU.

One process, the homework model (dim 16, mults 1 2 4 8) on 32 images of 32 px, alternating
passes with every lever and with every lever but the kernel (the same weights and inputs), in float32 and in
bf16 autocast; prints the medians and the median of the paired ratios, and how far apart
the two outputs are.

    python benchmarks/attention_kernel.py [--passes 40] [--images 32]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hw2 import fast  # noqa: E402
from hw2.fast import kernel  # noqa: E402
from hw2.fast.memory import keep_freed_memory  # noqa: E402
from hw2.precision import autocast  # noqa: E402
from unet import Unet  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passes", type=int, default=40,
                        help="passes each way, per precision (the first 2 are not counted)")
    parser.add_argument("--images", type=int, default=32, help="images per pass")
    args = parser.parse_args()
    keep_freed_memory()  # as main.py does on a CPU
    if kernel.kernel() is None:
        sys.exit(f"nothing to compare: {kernel.status()}")
    ways = {"torch": [lever for lever in fast.LEVERS if lever != "attention_kernel"], "kernel": fast.LEVERS}
    torch.manual_seed(0)
    model = Unet(16).eval()
    x, t = torch.randn(args.images, 3, 32, 32), torch.full((args.images,), 25)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.images} images of 32 px per pass")
    for dtype in (None, torch.bfloat16):
        times = {way: [] for way in ways}
        with fast.sampling(model), autocast("cpu", dtype):
            outputs = {}
            for way, levers in ways.items():
                fast.speed_up(model, levers)
                outputs[way] = model(x, t).float()
            for _ in range(args.passes):
                for way, levers in ways.items():
                    fast.speed_up(model, levers)
                    start = time.perf_counter()
                    model(x, t)
                    times[way].append(time.perf_counter() - start)
        torch_s, kernel_s = (times[way][2:] for way in ways)
        ratios = [a / b for a, b in zip(torch_s, kernel_s)]
        name = "float32" if dtype is None else "bf16"
        print(f"{name:8s} torch {statistics.median(torch_s) * 1e3:6.1f} ms,"
              f" kernel {statistics.median(kernel_s) * 1e3:6.1f} ms per pass; paired ratio {statistics.median(ratios):.3f}"
              f" (quartiles {' '.join(f'{q:.3f}' for q in statistics.quantiles(ratios, n=4))});"
              f" outputs differ by at most {(outputs['torch'] - outputs['kernel']).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
