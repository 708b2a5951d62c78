"""Host time of one eager `omnisparse::attention` call (GPU; not a test): where the Python side of
the op spends its time, by cProfile over repeated calls, beside the call's wall and CUDA-graph time.

SmolLM2 shapes (B 1, H 9 / Hkv 3, D 64, bf16, causal) on the `mixed` preset of
`omnicompile.demos.structured` at each length. Prints the wall time per eager call (synchronised at the
end only), the replay time of the same call captured in a CUDA graph, the CUDA kernels per call and
the top operators by own CPU time (torch.profiler), and the top functions by own time (cProfile).
    python3 scripts/gpu_profile_host.py --seq-lens 8192 32768
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

import omnicompile  # noqa: F401  (registers the op)
from omnicompile.config import OmniSparseConfig
from omnicompile.demos.structured import structured_qkv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    config = OmniSparseConfig(min_seq_len=1024).to_json()  # the sparse path at every length
    for seq_len in args.seq_lens:
        q, k, v = structured_qkv("mixed", 1, 9, 3, seq_len, 64, dtype=torch.bfloat16, device="cuda")

        def call():
            return torch.ops.omnisparse.attention(q, k, v, None, 0.0, True, None, True, config, "site")

        for _ in range(3):
            call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.calls):
            call()
        host = (time.perf_counter() - start) / args.calls
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / args.calls
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            call()
            with torch.cuda.graph(graph, stream=stream):
                call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.calls):
            graph.replay()
        torch.cuda.synchronize()
        replay = (time.perf_counter() - start) / args.calls
        print(
            f"S={seq_len}: host {host * 1e3:.3f} ms/call, wall {wall * 1e3:.3f} ms/call, "
            f"graph replay {replay * 1e3:.3f} ms/call"
        )
        with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                call()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        print(f"CUDA kernels per call: {len(kernels) / args.calls:.1f}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            call()
        profiler.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        print(text.getvalue())


if __name__ == "__main__":
    main()
