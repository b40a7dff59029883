"""Command line: ``python -m therapist_effects <command>`` (also installed as ``therapist-effects``).

Commands:
  simulate-demo [--out data/demo_sessions.csv]   regenerate the demo data (deterministic)
  validate-config CONFIG.yaml                     check a config file; prints one line per problem
  screenshots [--results results] [--out docs/img] full-page PNGs of the demo's reports (headless Chromium)
  plan --therapists K --caseload N --icc RHO [--dispersion D] [--reduction R] [--json] [--seed S] [--reps M]
                                                  design planning by simulation (therapist_effects.planning)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .exceptions import TherapistEffectsError

#: Settings of the demo data set: 4 services, 60 therapists, a feedback arm randomised within
#: therapist, therapist variance 1.6 (control) vs 0.8 (feedback) on the PHQ-9 end score.
DEMO_SEED = 20240601


def simulate_demo(out: str | Path, truth_out: str | Path | None = None) -> None:
    from .simulate import PracticeSimulation, inject_data_errors, simulate_practice

    settings = PracticeSimulation(seed=DEMO_SEED)
    sessions, truth = simulate_practice(settings)
    sessions = inject_data_errors(sessions, seed=DEMO_SEED)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from .io.csvsafe import safe_csv

    safe_csv(sessions, out, lineterminator="\n")
    if truth_out:
        Path(truth_out).write_text(json.dumps(truth, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="therapist-effects", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("simulate-demo", help="regenerate the demo data (deterministic)")
    p.add_argument("--out", default="data/demo_sessions.csv")
    p.add_argument("--truth", default="data/demo_truth.json")
    v = sub.add_parser("validate-config", help="check a config file")
    v.add_argument("config")
    sc = sub.add_parser("screenshots", help="full-page PNGs of the demo's reports (README pictures)")
    sc.add_argument("--results", default="results")
    sc.add_argument("--dataset", default="demo")
    sc.add_argument("--out", default="docs/img")
    pl = sub.add_parser("plan", help="design planning: expected ICC interval width, P(singular fit), power")
    pl.add_argument("--therapists", type=int, required=True, help="number of therapists K")
    pl.add_argument("--caseload", type=float, required=True, help="patients per therapist N (mean)")
    pl.add_argument("--icc", type=float, required=True, help="therapist ICC (control arm with --reduction)")
    pl.add_argument("--dispersion", type=float, default=0.0, help="coefficient of variation of caseloads (0: equal)")
    pl.add_argument("--reduction", type=float, default=None, help="relative ICC reduction with feedback, for power")
    pl.add_argument("--reps", type=int, default=200, help="simulated data sets (default 200)")
    pl.add_argument("--seed", type=int, default=20261121)
    pl.add_argument("--level", type=float, default=0.95)
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        if args.command == "simulate-demo":
            simulate_demo(args.out, args.truth)
            print(f"wrote {args.out} and {args.truth}")
        elif args.command == "validate-config":
            from .config import load_config

            load_config(args.config)
            print(f"{args.config}: ok")
        elif args.command == "screenshots":
            from .report.browser import screenshot

            res, out = Path(args.results), Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            for html, png in ((res / args.dataset / "report.html", "research_report.png"),
                              (res / args.dataset / "therapist_report.html", "therapist_report.png"),
                              (res / "meta" / "report.html", "meta_report.png")):
                screenshot(html, out / png, width=1280)
                print(f"wrote {out / png}")
        elif args.command == "plan":
            from .planning import plan

            res = plan(args.therapists, args.caseload, args.icc, dispersion=args.dispersion,
                       reduction=args.reduction, reps=args.reps, seed=args.seed, level=args.level)
            if args.json:
                print(json.dumps(res, sort_keys=True))
            else:
                print(f"design: {res['therapists']} therapists x {res['caseload']:g} patients, ICC {res['icc']:g}"
                      + (f", caseload CV {res['dispersion']:g}" if res["dispersion"] else "")
                      + f"; {res['reps']} simulated data sets (seed {res['seed']})")
                print(f"expected_ci_width: {res['expected_ci_width']:.4f} (Monte Carlo se {res['mc_se_width']:.4f}; "
                      f"large-sample {res['large_sample_width']:.4f})")
                print(f"p_singular: {res['p_singular']:.3f}")
                if res["power"] is not None:
                    print(f"power: {res['power']:.3f} (Monte Carlo se {res['mc_se_power']:.3f}) to detect a "
                          f"{res['reduction']:.0%} ICC reduction")
    except TherapistEffectsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
