"""Command line: `python -m etap_torch demo [--dataset chemical|etth1] ...`."""

from __future__ import annotations

import argparse
import sys


def _budgets(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m etap_torch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="the main job on a bundled dataset and its committed ground truth",
        description="Train the all-tasks model with the tracker, fit ETAP on a few "
        "labelled groups, predict every group and choose groupings.",
    )
    demo.add_argument("--dataset", choices=("chemical", "etth1"), default="chemical")
    demo.add_argument("--labelled", type=int, default=10, help="labelled groups (default 10)")
    demo.add_argument("--seed", type=int, default=0, help="training and sampling seed")
    demo.add_argument("--out", default="etap_out", help="output folder (default etap_out)")
    demo.add_argument("--budgets", type=_budgets, default=[2, 3, 4], help="e.g. 2,3,4")
    demo.add_argument("--every", type=int, default=1, help="score every k-th step")
    demo.add_argument(
        "--lookahead-every",
        type=int,
        default=10,
        help="exact lookahead every k-th step; 0 switches it off (default 10)",
    )
    demo.add_argument("--max-epochs", type=int, default=None, help="cap the training epochs")
    demo.add_argument(
        "--quality-sizes",
        type=_budgets,
        default=[5, 10, 20, 30, 40, 50],
        help="labelled counts of the quality curve",
    )
    demo.add_argument("--quality-repeats", type=int, default=5)
    demo.add_argument("--no-figures", action="store_true", help="skip the figures")
    args = parser.parse_args(argv)

    from etap_torch.demo import DemoConfig, format_report, run_demo

    config = DemoConfig(
        dataset=args.dataset,
        labelled=args.labelled,
        seed=args.seed,
        out_dir=args.out,
        budgets=tuple(args.budgets),
        every=args.every,
        lookahead_every=args.lookahead_every,
        max_epochs=args.max_epochs,
        quality_sizes=tuple(args.quality_sizes),
        quality_repeats=args.quality_repeats,
        figures=not args.no_figures,
    )
    try:
        report = run_demo(config)
    except ValueError as error:
        demo.error(str(error))
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
