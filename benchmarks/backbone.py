"""FocalNet backbone speed: ours vs timm with identical weights and inputs, in one run.

    python benchmarks/backbone.py                 # tiny + base, CPU, eager (+ channels_last)
    python benchmarks/backbone.py --compile       # also torch.compile (slow to compile on CPU)
    python benchmarks/backbone.py --device cuda --batch 32               # GPU, strict float32
    python benchmarks/backbone.py --device cuda --batch 32 --tf32        # GPU, TF32 matmuls and convs

Prints Markdown tables with ours/timm ratios (> 1 means ours is faster). Timings are medians over
repeats, ours and timm interleaved so that load on the machine affects both alike.

On a GPU both models run at the same float32 precision: by default PyTorch lets cuDNN use TF32 for
convolutions but not cuBLAS for matmuls, which would favour timm (its 1x1 projections are convs, ours
linear layers); this script sets both to strict float32, or both to TF32 with ``--tf32``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from focalnet_pl import create_focalnet
from focalnet_pl import cpu_fastpath
from focalnet_pl.weights import load_weights


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(fns: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn ``repeats`` times after a warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def build_pair(name: str, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    ref = timm.create_model(name, num_classes=1000, drop_path_rate=0.0)
    ours = create_focalnet(name, num_classes=1000, drop_path_rate=0.0)
    load_weights(ours, ref.state_dict())
    return ours.to(device), ref.to(device)


def inference_fn(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def run() -> None:
        with torch.inference_mode():
            model(x)
    return run


def train_fn(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
    return run


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward, counted on the plain path (the counter does not see oneDNN convolutions)."""
    model.eval()
    with cpu_fastpath.disabled(), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    seconds = interleaved_medians({"mm": lambda: a @ b}, repeats, device)["mm"]
    return 2 * n**3 / seconds / 1e9


def row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["focalnet_tiny_srf", "focalnet_base_srf"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resolutions", nargs="+", type=int, default=[224, 448, 896])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    parser.add_argument("--tf32", action="store_true", help="GPU: TF32 for matmuls and convolutions alike")
    parser.add_argument("--fastpath", choices=cpu_fastpath.MODES, default="auto",
                        help="CPU fast paths: measured per shape class (auto), always (on) or never (off)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(0)
    precision = ("TF32" if args.tf32 else "strict float32") if device.type == "cuda" else "float32"
    print(f"torch {torch.__version__}, timm {timm.__version__}, device {device}, {precision}, "
          f"threads {torch.get_num_threads()}")
    print(f"CPU: {cpu_fastpath.cpu_description()}; CPU fast paths: {args.fastpath}\n")
    cpu_fastpath.set_mode(args.fastpath)

    print("### Throughput at 224 px, batch", args.batch, "(images/s; ratio = ours / timm)\n")
    print(row(["model", "mode", "timm", "ours", "ratio", "timm channels_last", "ours channels_last input", "ratio"]))
    print(row(["---"] * 8))
    for name in args.variants:
        ours, ref = build_pair(name, device)
        x = torch.randn(args.batch, 3, 224, 224, device=device)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        ref_cl = timm.create_model(name, num_classes=1000, drop_path_rate=0.0)
        ref_cl.load_state_dict(ref.state_dict())
        ref_cl = ref_cl.to(device).to(memory_format=torch.channels_last)
        for mode, make in (("inference", inference_fn), ("train step", train_fn)):
            t = interleaved_medians({"timm": make(ref, x), "ours": make(ours, x), "timm_cl": make(ref_cl, x_cl),
                                     "ours_cl": make(ours, x_cl)}, args.repeats, device)
            ips = {k: args.batch / v for k, v in t.items()}
            print(row([name, mode, f"{ips['timm']:.1f}", f"{ips['ours']:.1f}", f"{ips['ours'] / ips['timm']:.2f}x",
                       f"{ips['timm_cl']:.1f}", f"{ips['ours_cl']:.1f}", f"{ips['ours_cl'] / ips['timm_cl']:.2f}x"]))
        if args.compile:
            for mode, make in (("inference (compiled)", inference_fn), ("train step (compiled)", train_fn)):
                fns = {"timm": make(torch.compile(ref), x), "ours": make(torch.compile(ours), x)}
                t = interleaved_medians(fns, args.repeats, device)
                ips = {k: args.batch / v for k, v in t.items()}
                print(row([name, mode, f"{ips['timm']:.1f}", f"{ips['ours']:.1f}",
                           f"{ips['ours'] / ips['timm']:.2f}x", "", "", ""]))
        del ours, ref, ref_cl

    name = args.variants[0]
    ours, ref = build_pair(name, device)
    peak = matmul_gflops(device)
    print(f"\n### {name} inference vs resolution (batch 1); float32 matmul peak in this run: {peak:.1f} GFLOP/s\n")
    print(row(["resolution", "timm ms", "ours ms", "ratio (timm/ours time)", "GFLOPs", "ours GFLOP/s",
               "% of matmul"]))
    print(row(["---"] * 7))
    for res in args.resolutions:
        x = torch.randn(1, 3, res, res, device=device)
        t = interleaved_medians({"timm": inference_fn(ref, x), "ours": inference_fn(ours, x)},
                                max(3, args.repeats // 2), device)
        flops = forward_flops(ours, x)
        achieved = flops / t["ours"] / 1e9
        print(row([res, f"{t['timm'] * 1e3:.1f}", f"{t['ours'] * 1e3:.1f}", f"{t['timm'] / t['ours']:.2f}x",
                   f"{flops / 1e9:.2f}", f"{achieved:.1f}", f"{100 * achieved / peak:.0f}%"]))
    if device.type == "cpu" and args.fastpath == "auto":
        print("\nCPU fast-path choices measured in this run (shape class: best times -> choice):")
        for line in cpu_fastpath.calibration_report():
            print("  " + line)


if __name__ == "__main__":
    main()
