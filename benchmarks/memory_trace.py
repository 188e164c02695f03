"""Where a CPU run's peak RSS comes from: the bytes outside malloc's heap (the runtime and the model's
weights, which safetensors maps from the file), the heap's bytes in use (glibc ``mallinfo2``), and
what the heap holds but has free (freed blocks it keeps for reuse, and holes between live blocks).

Runs the benchmark's preftune job (``vs_trl.run_preftune``: SmolLM2-135M float32, the short shape)
in this process while a thread samples RSS and the heap every millisecond, and prints both at the
phase boundaries of each step (forward, backward, clip, optimizer) and at their maxima. A phase's
row is its first sample; the sampler may see a label a moment before the work behind it (the end of
backward's last allocation can show as "clip").

    python benchmarks/memory_trace.py --batch 4 --steps 4
    python benchmarks/memory_trace.py --batch 4 --steps 4 --optim-in-backward
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use():
    """A function returning malloc's bytes in use (heap blocks + mmapped blocks), or None off glibc 2.33+."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def in_use() -> int:
        m = fn()
        return m.uordblks + m.hblkhd

    return in_use


def trace(job: dict) -> dict:
    """Run the job, sampling; returns {"rows": [(phase, rss, in_use)], "max_rss": (...), "max_in_use": (...),
    "result": run_preftune's result}. Sizes in bytes; in_use is -1 where mallinfo2 is missing."""
    import vs_trl

    from preftune import trainer as tr

    in_use = heap_in_use() or (lambda: -1)
    page = os.sysconf("SC_PAGE_SIZE")
    phase = ["load"]
    out: dict = {"rows": [], "max_rss": (0, "", 0), "max_in_use": (0, "", 0)}
    done = threading.Event()

    def sample():
        last = None
        while not done.is_set():
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page
            use, now = in_use(), phase[0]
            if rss > out["max_rss"][0]:
                out["max_rss"] = (rss, now, use)
            if use > out["max_in_use"][0]:
                out["max_in_use"] = (use, now, rss)
            if now != last:
                out["rows"].append((now, rss, use))
                last = now
            time.sleep(0.001)

    step = [0]
    cls = tr.DPOTrainer
    real = {name: getattr(cls, name) for name in ("_pair_losses", "_clip", "_start")}

    def pair_losses(self, *a, **k):
        step[0] += 1
        phase[0] = f"forward {step[0]}"
        res = real["_pair_losses"](self, *a, **k)
        phase[0] = f"backward {step[0]}"
        return res

    def clip(self):
        phase[0] = f"clip {step[0]}"
        res = real["_clip"](self)
        phase[0] = f"optimizer {step[0]}"
        return res

    def train(self, *a, **k):
        phase[0] = "train(): reference pass"
        return real["_start"](self, *a, **k)

    cls._pair_losses, cls._clip, cls._start = pair_losses, clip, train
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        phase[0] = "construction"
        out["result"] = vs_trl.run_preftune(job)
    finally:
        for name, fn in real.items():
            setattr(cls, name, fn)
        done.set()
        thread.join()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--shape", default="short", choices=("short", "long"))
    p.add_argument("--optim-in-backward", action="store_true", help="preftune's optim_in_backward (no clipping)")
    a = p.parse_args(argv)

    import vs_trl

    from preftune.models import embedded_model_path

    job = vs_trl.make_job(str(embedded_model_path()), a.shape, a.steps, a.batch,
                          max_grad_norm=0.0 if a.optim_in_backward else 1.0, optim_in_backward=a.optim_in_backward)
    out = trace(job)
    mib = 2**20
    print(f"{'phase':22s} {'RSS MiB':>8s} {'heap in use MiB':>16s}")
    for name, rss, use in out["rows"]:
        print(f"{name:22s} {rss / mib:8.0f} {use / mib:16.0f}")
    rss, where, use = out["max_rss"]
    print(f"max RSS {rss / mib:.0f} MiB in '{where}' (heap in use then {use / mib:.0f} MiB)")
    use, where, rss = out["max_in_use"]
    print(f"max heap in use {use / mib:.0f} MiB in '{where}' (RSS then {rss / mib:.0f} MiB)")
    print(f"peak RSS of the process (ru_maxrss) {out['result']['peak_mem'] / mib:.0f} MiB; "
          f"losses {[round(x, 5) for x in out['result']['losses']]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
