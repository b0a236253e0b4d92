#!/usr/bin/env python
"""Time and peak memory of pml-dsb's evaluation against PML's AccuracyCalculator.

Side by side, on clustered random embeddings (Gaussian blobs around random
unit centres, noise / sqrt(d) per coordinate), for each size:

* ``ours``: ``evaluate_embeddings(recall_ks=(1, 2, 4, 8), nredo=--nredo)``,
  i.e. one exact faiss ``IndexFlatIP`` search with k = 8 (+1 for the query
  itself) and seeded faiss k-means with ``nredo`` restarts; the time of the
  search (with Recall@K) and of NMI are shown separately, and ``ours, nredo=1``
  adds the time of NMI with one restart (the same k-means work as PML's) to
  the same search;
* ``pml k=8`` and ``pml default k``: ``AccuracyCalculator(include=("precision_at_1",
  "NMI"), k=8 / k=None)`` on the same, L2-normalised, embeddings (as PML's tester
  gives them). PML's default k searches all N neighbours; above
  ``--pml-default-max-n`` it is skipped with a note.

Every measurement runs in a fresh subprocess with torch, faiss (and
OMP/MKL/OpenBLAS) limited to ``--threads`` threads. Peak memory is the
subprocess's ``ru_maxrss``; ``+MB`` is the peak minus the resident size just
before the call (after the data were generated), i.e. what the evaluation
itself added. A table is printed and written to ``--out`` (Markdown), with the
raw numbers, versions, git revision and arguments in a ``.json`` beside it.

    python benchmarks/bench_evaluation.py              # the full run (minutes)
    python benchmarks/bench_evaluation.py --quick      # a small run (seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

# the checkout's pml_dsb, not an installed copy (the worker imports it)
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_environment import git_revision  # noqa: E402

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclass(frozen=True)
class Size:
    n: int
    dim: int
    classes: int
    noise: float
    note: str = ""


FULL_SIZES = (
    Size(5924, 512, 100, 3.5, "CUB-200 test size"),
    Size(8131, 512, 100, 3.5, "Cars196 test size"),
    Size(10000, 512, 100, 3.5, "CIFAR-100 test size"),
    Size(100000, 128, 1000, 2.0, "large"),
)
QUICK_SIZES = (
    Size(1500, 64, 20, 2.0, "quick"),
    Size(3000, 32, 30, 1.5, "quick"),
)
METHODS = ("ours", "pml_k8", "pml_default")


# --------------------------------------------------------------------- worker
def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_data(size: Size, seed: int):
    """Clustered random float32 embeddings and int64 labels, built in chunks."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((size.classes, size.dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = rng.permutation(np.arange(size.n) % size.classes).astype(np.int64)
    x = np.empty((size.n, size.dim), dtype=np.float32)
    scale = np.float32(size.noise / np.sqrt(size.dim))
    for s in range(0, size.n, 8192):
        e = min(s + 8192, size.n)
        x[s:e] = centers[labels[s:e]] + scale * rng.standard_normal((e - s, size.dim), dtype=np.float32)
    return x, labels


def worker(spec: dict) -> dict:
    import faiss
    import torch

    threads = spec["threads"]
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    size = Size(**spec["size"])
    x, y = make_data(size, spec["seed"])
    out: dict = {}
    if spec["method"] == "ours":
        from pml_dsb.evaluation import evaluate_embeddings, nmi

        base_rss, base_peak, load0 = _rss_bytes(), _maxrss_bytes(), os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        res = evaluate_embeddings(x, y, recall_ks=(1, 2, 4, 8), nmi=False)
        t1, c1 = time.perf_counter(), time.process_time()
        nmi_value = nmi(x, y, seed=spec["seed"], nredo=spec["nredo"])
        t2, c2 = time.perf_counter(), time.process_time()
        peak = _maxrss_bytes()
        nmi_1 = nmi(x, y, seed=spec["seed"], nredo=1)
        t3, c3 = time.perf_counter(), time.process_time()
        out.update(
            time_s=t2 - t0, cpu_s=c2 - c0, knn_cpu_s=c1 - c0, nmi_cpu_s=c2 - c1, nmi1_cpu_s=c3 - c2,
            knn_s=t1 - t0, nmi_s=t2 - t1, nmi1_s=t3 - t2,
            recall={k: res[f"recall_at_{k}"] for k in (1, 2, 4, 8)}, nmi=nmi_value, nmi_nredo1=nmi_1,
        )
    else:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        xt = torch.nn.functional.normalize(torch.from_numpy(x))
        yt = torch.from_numpy(y)
        del x
        k = 8 if spec["method"] == "pml_k8" else None
        calc = AccuracyCalculator(include=("precision_at_1", "NMI"), k=k, device=torch.device("cpu"))
        base_rss, base_peak, load0 = _rss_bytes(), _maxrss_bytes(), os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        res = calc.get_accuracy(xt, yt)
        t1, c1 = time.perf_counter(), time.process_time()
        peak = _maxrss_bytes()
        out.update(time_s=t1 - t0, cpu_s=c1 - c0, recall={1: res["precision_at_1"]}, nmi=float(res["NMI"]))
    out.update(
        peak_bytes=peak, added_bytes=max(peak - base_rss, 0), base_peak_bytes=base_peak,
        loadavg_before=load0, loadavg_after=os.getloadavg()[0],
    )
    return out


# --------------------------------------------------------------------- parent
def run_measurement(method: str, size: Size, args) -> dict:
    spec = dict(method=method, size=asdict(size), seed=args.seed, nredo=args.nredo, threads=args.threads)
    env = dict(os.environ, **{v: str(args.threads) for v in THREAD_ENV})
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        env=env, capture_output=True, text=True, timeout=args.worker_timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{method} at N={size.n} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def _human(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def _mb(v):
    return "-" if v is None else f"{v / 2**20:.0f}"


def render(rows: list[dict], notes: list[str], args) -> str:
    head = (
        "| N | d | classes | method | wall (s) | CPU (s) | kNN+R@K CPU (s) | NMI CPU (s) | peak RSS (MB) | +MB | "
        "R@1 | R@2 | R@4 | R@8 | NMI | load |"
    )
    lines = [head, "|" + "---|" * 16]
    for r in rows:
        rec = r.get("recall", {})
        load = r.get("loadavg_before")
        lines.append(
            f"| {r['n']:,} | {r['dim']} | {r['classes']} | {r['label']} | {_fmt(r.get('time_s'), '.2f')} | "
            f"{_fmt(r.get('cpu_s'), '.2f')} | {_fmt(r.get('knn_cpu_s'), '.2f')} | {_fmt(r.get('nmi_cpu_s'), '.2f')} | "
            f"{_mb(r.get('peak_bytes'))} | {_mb(r.get('added_bytes'))} | "
            f"{_fmt(rec.get('1'))} | {_fmt(rec.get('2'))} | {_fmt(rec.get('4'))} | {_fmt(rec.get('8'))} | "
            f"{_fmt(r.get('nmi'))} | {_fmt(load, '.1f')} |"
        )
    text = "\n".join(lines)
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return text


def environment() -> dict:
    import faiss
    import numpy
    import pytorch_metric_learning
    import sklearn
    import torch

    rev, dirty = git_revision()
    return dict(
        python=platform.python_version(), platform=platform.platform(), cpu_count=os.cpu_count(),
        torch=torch.__version__, faiss=faiss.__version__, pytorch_metric_learning=pytorch_metric_learning.__version__,
        numpy=numpy.__version__, sklearn=sklearn.__version__, git_revision=rev, git_dirty=dirty,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Time and peak memory of pml-dsb's Recall@K + NMI against PML's AccuracyCalculator.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes only (seconds, for CI)")
    parser.add_argument("--out", default=None, help="Markdown table path; default results/bench_evaluation[_quick].md")
    parser.add_argument("--seed", type=int, default=0, help="data and k-means seed")
    parser.add_argument("--nredo", type=int, default=10, help="k-means restarts of ours")
    parser.add_argument("--threads", type=int, default=1, help="torch / faiss / BLAS threads")
    parser.add_argument("--pml-default-max-n", type=int, default=None,
                        help="skip PML's default k above this N (default 20000; 2000 with --quick)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--worker-timeout", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    max_n = args.pml_default_max_n if args.pml_default_max_n is not None else (2000 if args.quick else 20000)
    out_path = args.out or os.path.join("results", "bench_evaluation_quick.md" if args.quick else "bench_evaluation.md")
    jobs, notes = [], []
    for size in sizes:
        for method in args.methods:
            if method == "pml_default" and size.n > max_n:
                notes.append(
                    f"PML default k at N={size.n:,} skipped: it searches all N neighbours "
                    f"(an N x N result, {_human(size.n**2 * 12)} for distances and indices)."
                )
                print(f"note: {notes[-1]}", flush=True)
                continue
            jobs.append((method, size))

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = None if (args.no_progress or tqdm is None) else tqdm(total=len(jobs), desc="measurements")
    rows = []
    labels = {"ours": f"ours (nredo={args.nredo})", "pml_k8": "PML k=8", "pml_default": "PML default k"}
    for method, size in jobs:
        if bar is not None:
            bar.set_postfix_str(f"{method} N={size.n}")
        res = run_measurement(method, size, args)
        row = dict(n=size.n, dim=size.dim, classes=size.classes, method=method, label=labels[method], **res)
        rows.append(row)
        if method == "ours":
            rows.append(dict(
                n=size.n, dim=size.dim, classes=size.classes, method="ours_nredo1", label="ours (nredo=1)",
                time_s=res["knn_s"] + res["nmi1_s"], cpu_s=res["knn_cpu_s"] + res["nmi1_cpu_s"],
                knn_cpu_s=res["knn_cpu_s"], nmi_cpu_s=res["nmi1_cpu_s"],
                peak_bytes=None, added_bytes=None, recall=res["recall"], nmi=res["nmi_nredo1"],
            ))
        msg = (f"{labels[method]:>16} N={size.n:>7,} d={size.dim:>3}: wall {res['time_s']:.2f} s, "
               f"CPU {res['cpu_s']:.2f} s, peak {res['peak_bytes'] / 2**20:.0f} MB, "
               f"load {res['loadavg_before']:.1f}")
        (bar.write if bar is not None else print)(msg)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    for size in sizes:
        ours = next((r for r in rows if r["n"] == size.n and r["method"] == "ours"), None)
        pml = next((r for r in rows if r["n"] == size.n and r["method"] == "pml_k8"), None)
        if ours and pml:
            net = round(abs(ours["recall"]["1"] - pml["recall"]["1"]) * size.n)
            verdict = "equals" if net == 0 else f"differs (net {net} of {size.n:,} queries, float32 near-ties?) from"
            notes.append(
                f"N={size.n:,}: ours R@1 {verdict} PML precision_at_1 "
                f"({ours['recall']['1']:.6f} vs {pml['recall']['1']:.6f}); CPU time ours / PML k=8: "
                f"{ours['cpu_s'] / pml['cpu_s']:.2f} (nredo={args.nredo}), "
                f"{(ours['knn_cpu_s'] + ours['nmi1_cpu_s']) / pml['cpu_s']:.2f} (nredo=1), "
                f"{ours['knn_cpu_s'] / pml['cpu_s']:.2f} (kNN + Recall@1,2,4,8 alone)."
            )
    notes.append(
        f"{args.threads} thread(s); 'CPU' is the process CPU time of the call, robust to other load on "
        "the machine, 'wall' is not; 'load' is the 1-minute load average when the call started; "
        f"'+MB' is peak RSS minus RSS just before the call; R@1 of PML is its precision_at_1; NMI: ours k-means seed {args.seed}, "
        f"niter 20; PML k-means niter 20, one restart, faiss' default seed. "
        "'ours (nredo=1)' reuses the search of 'ours' and times NMI with one restart (no separate memory figure)."
    )
    table = render(rows, notes, args)
    print()
    print(table)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    env = environment()
    header = (
        f"# bench_evaluation\n\ncommand: `python benchmarks/bench_evaluation.py {' '.join(sys.argv[1:])}`\n\n"
        f"{', '.join(f'{k} {v}' for k, v in env.items())}\n\n"
    )
    with open(out_path, "w") as f:
        f.write(header + table + "\n")
    with open(os.path.splitext(out_path)[0] + ".json", "w") as f:
        json.dump(dict(args=vars(args), environment=env, sizes=[asdict(s) for s in sizes], rows=rows, notes=notes), f, indent=2)
    print(f"\nwritten to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
