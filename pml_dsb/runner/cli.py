"""``pml-dsb bench``: train and evaluate every method of a config, write the tables.

``register(subparsers)`` adds the subcommand to ``pml_dsb.cli``'s parser.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger(__name__)

__all__ = ["register", "run_bench_command", "parse_seeds", "parse_methods"]

_DESCRIPTION = """\
Train every method of a benchmark config (NSM, CB-NSM, DSB-NSM, ST, CB-ST,
DSB-ST by default) with every seed, evaluate Recall@K and NMI on the test
split after each epoch, keep each run's best epoch (test Recall@1), and write
the run folder <out>/<run name>/: the paper's table (mean ± std over seeds),
paired differences to the plain parent with paired t-tests, per-class
Recall@1 with many/medium/few groups, a plot of per-class Recall@1 against
class count and semantic scale, the resolved config, seeds, package versions
and git revision, and per-run checkpoints (checkpoints/<method>/seed<k>/).

Without arguments: the built-in digits-LT config (imbalance factor 50, five
seeds, CPU, offline, a few minutes on two cores).

Under torchrun (torchrun --nproc_per_node=N -m pml_dsb.cli bench ...) the N
processes train every run together with DistributedDataParallel, each on its
slice of every batch (the global batch is the one-process batch); process 0
evaluates, writes the checkpoints and the run folder and prints the table.
Backend: nccl with --device cuda (each process on cuda:LOCAL_RANK), else gloo.
--resume needs the same number of processes as the interrupted run.
"""

_EPILOG = """\
examples:
  pml-dsb bench
  pml-dsb bench --seeds 0 --epochs 8 --methods NSM,DSB-NSM --no-progress
  pml-dsb bench --config benchmarks/configs/cub200_dim64.toml --data-root ~/data --device cuda
  pml-dsb bench --config benchmarks/configs/cifar100lt_if50.toml --data-root ~/data --resume
  torchrun --nproc_per_node=2 -m pml_dsb.cli bench --seeds 0 --methods NSM,DSB-NSM --no-progress
"""


#: most seeds one --seeds may list (a typo like 0-1000000 would otherwise build a huge list)
MAX_SEEDS = 1000


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; ``"0-4"`` -> ``[0, 1, 2, 3, 4]``."""
    from .config import MAX_SEED

    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = (int(v) for v in part.split("-", 1))
                if lo > hi:
                    raise argparse.ArgumentTypeError(f"seed range {part!r} runs backwards: write lo-hi with lo <= hi")
                if lo > MAX_SEED or hi > MAX_SEED or hi - lo >= MAX_SEEDS:  # before listing them
                    raise argparse.ArgumentTypeError(
                        f"seeds must be at most {MAX_SEEDS} integers in [0, {MAX_SEED}], got {text!r}")
                seeds.extend(range(lo, hi + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers like 0,1,2 or 0-4, got {text!r}") from None
    if not seeds or any(not 0 <= s <= MAX_SEED for s in seeds) or len(seeds) > MAX_SEEDS:
        raise argparse.ArgumentTypeError(
            f"seeds must be at most {MAX_SEEDS} integers in [0, {MAX_SEED}] like 0,1,2, got {text!r}")
    return seeds


def parse_methods(text: str) -> list[str]:
    """``"nsm,dsb-st"`` -> ``["NSM", "DSB-ST"]`` (case and ``_``/``-`` ignored)."""
    from .methods import canonical_method

    try:
        return [canonical_method(m) for m in text.split(",") if m.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "bench", help="train and evaluate the methods of a benchmark config, write the tables",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="TOML", default=None,
                   help="benchmark config file (TOML; see benchmarks/configs/). Default: the built-in "
                        "digits-LT config shipped with the package (pml_dsb/runner/configs/digits_lt.toml)")
    p.add_argument("--data-root", metavar="DIR", default=None,
                   help="folder holding the dataset (CUB_200_2011/, cars_annos.mat + car_ims/, "
                        "cifar-100-python/); overrides [dataset] root. Not needed for digits-LT. "
                        "Nothing is downloaded")
    p.add_argument("--seeds", type=parse_seeds, default=None, metavar="LIST",
                   help="training seeds, e.g. 0,1,2 or 0-4 (default: the config's seeds). Each seed "
                        "fixes the model initialisation, the sample order and the augmentations; "
                        "methods with the same seed are paired")
    p.add_argument("--methods", type=parse_methods, default=None, metavar="LIST",
                   help="subset of methods, e.g. NSM,DSB-NSM (choices: NSM, CB-NSM, DSB-NSM, ST, CB-ST, "
                        "DSB-ST; default: the config's). A paired test needs the method's parent "
                        "(NSM or ST) in the list")
    p.add_argument("--epochs", type=_positive, default=None, metavar="N",
                   help="override [training] epochs. DSB weights only after warm-up "
                        "([dsb] warmup_epochs epochs of samples), so keep N above it")
    p.add_argument("--out", metavar="DIR", default="results",
                   help="parent folder of the run folder (default: results/); the run folder is "
                        "<out>/<run name>")
    p.add_argument("--run-name", metavar="NAME", default=None,
                   help="name of the run folder (default: the config's name)")
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="torch device: cpu (default), cuda or cuda:<index>")
    p.add_argument("--threads", type=_non_negative, default=None, metavar="N",
                   help="torch and faiss CPU threads (default: the config's [runtime] num_threads; "
                        "0 leaves the libraries' defaults)")
    p.add_argument("--no-progress", action="store_true",
                   help="hide the progress bars (logging stays on)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run folder's unfinished runs from their last checkpoint "
                        "(checkpoints/<method>/seed<k>/last.pt) and reuse finished ones; the results "
                        "equal those of an uninterrupted run. The config must be the same (more "
                        "--epochs allowed with a constant lr_schedule)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run folder's previous outputs and start afresh")
    p.add_argument("--stop-after-epoch", type=_positive, default=None, metavar="K",
                   help="stop every run after epoch K as if the process had been killed, leaving "
                        "checkpoints but no tables (to test or split a benchmark; finish with --resume)")
    p.set_defaults(func=run_bench_command)
    return p


def run_bench_command(args: argparse.Namespace) -> int:
    """The ``bench`` subcommand: load and override the config, apply the
    runtime settings, run the benchmark, print the table.

    Under ``torchrun`` it initialises the process group from the environment
    (:func:`pml_dsb.distributed.init_from_env`) and destroys it at the end;
    processes other than rank 0 log warnings and errors only, show no
    progress bars and print nothing."""
    import torch

    from .._device import resolve_device
    from ..distributed.ddp import destroy, init_from_env
    from ..distributed.gather import is_distributed
    from .bench import RunFolderExistsError, configure_runtime, run_benchmark
    from .checkpoint import CheckpointError
    from .config import ConfigError, apply_overrides, default_config_path, load_config

    if not getattr(args, "verbose", False):
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines list every CPU variant tried
    if args.resume and args.overwrite:
        logger.error("--resume and --overwrite exclude each other")
        return 2
    path = args.config or default_config_path()
    try:
        config = load_config(path)
        config = apply_overrides(config, epochs=args.epochs, seeds=args.seeds, methods=args.methods,
                                 data_root=args.data_root, num_threads=args.threads, name=args.run_name)
    except (ConfigError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        logger.error("--device: %s", err)
        return 2
    own_group = not is_distributed()  # a caller's process group is left alone
    try:
        ctx = init_from_env(backend="nccl" if device.type == "cuda" else "gloo")
    except (ValueError, RuntimeError) as err:
        logger.error("cannot join the torchrun processes: %s", err)
        return 2
    try:
        if not ctx.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        if ctx.enabled:
            if device.type == "cuda" and device != ctx.device:
                logger.info("--device %s: under torchrun each process uses cuda:LOCAL_RANK", args.device)
                device = ctx.device
            logger.info("torchrun: %d processes, backend %s", ctx.world_size,
                        torch.distributed.get_backend())
        logger.info("config %s", os.path.abspath(path))
        try:
            with configure_runtime(config.runtime, device):
                run_dir = run_benchmark(config, out=args.out, device=device,
                                        progress=not args.no_progress and ctx.is_main,
                                        resume=args.resume, overwrite=args.overwrite,
                                        stop_after_epoch=args.stop_after_epoch)
        except (RunFolderExistsError, ConfigError, CheckpointError, FileNotFoundError) as err:
            logger.error("%s", err)
            return 2
        except FloatingPointError as err:  # no bad input: the run itself failed
            logger.error("%s. Lower [training] lr or loss_lr; the finished runs and the checkpoints of "
                         "earlier epochs are kept", err)
            return 1
        if run_dir is None or not ctx.is_main:
            return 0
        with open(os.path.join(run_dir, "table.md"), encoding="utf-8") as fh:
            sys.stdout.write(fh.read())
        sys.stdout.write(f"\nRun folder: {run_dir}\n")
        sys.stdout.flush()
        return 0
    finally:
        if own_group:
            destroy()
