"""``spotdiff demo`` and ``spotdiff benchmark``: the end-to-end demo and the benchmark grid."""

from __future__ import annotations

import argparse


# ----------------------------------------------------------------------------- demo
def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the end-to-end demo on the synthetic dataset",
        description="Synthesize the default dataset, pre-train a small ResNet-18 with SimSiam and "
        "SimSiam + SPD, run PaDiM with random-init / SimSiam / SimSiam+SPD backbones on every object, "
        "print the table and write an HTML report. CPU only; measured run times are in the README.",
    )
    p.add_argument("--out", default="spotdiff-demo", help="working folder (default: ./spotdiff-demo)")
    p.add_argument("--quick", action="store_true", help="tiny scale, 64 px, few steps (smoke test)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, pre-training and PaDiM (default 0)")
    p.add_argument(
        "--weights",
        default=None,
        metavar="W",
        help="also run PaDiM on this backbone, e.g. imagenet (torchvision's ImageNet resnet18 from its "
        "cache; see --help of fit)",
    )
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from spotdiff.bench.demo import DemoSettings, run_demo

    result = run_demo(DemoSettings.preset(quick=args.quick, seed=args.seed), args.out, weights=args.weights)
    print(result.table.to_markdown())
    if result.smoke_note:
        print(f"\n{result.smoke_note}")
    print(f"report: {result.report}")
    return 0


# ----------------------------------------------------------------------------- benchmark
def add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark",
        help="run a benchmark grid from a YAML config, resumable",
        description="Run every (weights, downstream, object) cell of a YAML grid; cells already in "
        "<out>/cells are skipped, so an interrupted run resumes. Several processes may share one --out "
        "(each cell runs once); see docs/report.md and docs/benchmark_visa.yaml.",
    )
    p.add_argument("--config", required=True, help="benchmark YAML file")
    p.add_argument("--out", default="spotdiff-benchmark", help="output folder (default: ./spotdiff-benchmark)")
    p.add_argument("--shard", metavar="I/N", help="run only shard I of N (every N-th cell, from cell I)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N for this process (default: the config's device, auto)")
    p.add_argument(
        "--lease",
        type=float,
        metavar="S",
        help="take over a cell claimed from another machine after S s without heartbeat (default 300)",
    )
    p.add_argument("--collect", action="store_true", help="only write the tables from the cells done so far")
    p.set_defaults(run=_run_benchmark)


def _run_benchmark(args: argparse.Namespace) -> int:
    from spotdiff.bench.claims import LEASE_SECONDS, parse_shard
    from spotdiff.bench.config import load_config
    from spotdiff.bench.grid import collect_benchmark, run_benchmark
    from spotdiff.report.tables import tables_markdown

    shard = parse_shard(args.shard)
    config = load_config(args.config, device=args.device)
    if args.collect:
        result = collect_benchmark(config, args.out)
    else:
        result = run_benchmark(config, args.out, shard=shard, lease=LEASE_SECONDS if args.lease is None else args.lease)
    if result.tables:
        print(tables_markdown(result.tables))
    print(
        f"ran {len(result.ran)} cell(s), skipped {len(result.skipped)}; "
        + (
            f"{result.missing} cell(s) of the grid not done yet"
            if result.missing
            else f"report: {result.out / 'report.html'}"
            if result.tables
            else "every cell done"
        )
    )
    return 0
