"""Goodput as the SLOs tighten (DistServe's "SLO scale"), recomputed from a saved `bench serve` run.

A goodput ratio depends on the SLOs as much as on the systems: with SLOs loose enough every setup
serves nearly every request within them below capacity, and the ratio is ~1 whatever the tail
latencies. DistServe (OSDI '24, section 6) therefore reports attainment while multiplying the SLOs
by one factor, the SLO scale. This does the same from each request's own TTFT and TPOT in
``serve_requests.json``, so no request is sent again: a scale only changes which requests count as good.

For every scale s (TTFT SLO x s and TPOT SLO x s; ``--scale-slo ttft`` or ``tpot`` scales one of them):
  * each setup's SLO attainment and goodput at every rate of the run;
  * each disaggregated setup's goodput against the colocated setup with the *most* good requests at
    that scale and rate (the stricter baseline; `bench serve` compares TTFT against the lower-TTFT one);
  * each setup's DistServe goodput: the highest rate with at least the attainment goal.

    pdgrpc bench slo-scale bench-results/serve-mixed-run24 --scales 0.5 0.67 1 1.5

`bench serve` prints the same table at the end of a run (``--slo-scales``) and keeps it in serve.json.
"""

from __future__ import annotations

import json
import os
import sys

from pdgrpc.bench.stats import RequestResult, max_rate_at_attainment

DEFAULT_SCALES = (0.5, 0.67, 1.0, 1.5)
SCALED = ("both", "ttft", "tpot")


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="a `bench serve` output folder (serve.json and serve_requests.json)")
    p.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES),
                   help="SLO multipliers (1 = the run's SLOs)")
    p.add_argument("--scale-slo", choices=SCALED, default="both", help="which SLO the scale multiplies")
    p.add_argument("--out", default="", help="folder for slo_scale.json and .png (default: run_dir)")
    p.add_argument("--no-plots", action="store_true")


def scan(report: dict, raw: dict, scales=DEFAULT_SCALES, scaled: str = "both") -> dict:
    """The SLO-scale table of one `bench serve` run (its report and its per-request results)."""
    if scaled not in SCALED:
        raise ValueError(f"scale-slo must be one of {SCALED}, not {scaled!r}")
    if not scales or any(s <= 0 for s in scales):
        raise ValueError("SLO scales must be positive")
    slo, goal = report["slo"], report.get("attainment_goal", 0.9)
    setups = report["setups"]
    durations = {(name, float(r["offered_rate_rps"])): r["duration_s"] for name, s in setups.items() for r in s["runs"]}
    # (setup, rate) -> its requests, parsed once for every scale; one at a time has no rate to speak of
    results = {(name, float(rate)): [RequestResult(**r) for r in rows]
               for name, by_rate in raw.items() for rate, rows in by_rate.items() if float(rate) > 0 and rows}
    out: dict = {"slo": slo, "scaled": scaled, "attainment_goal": goal, "scales": []}
    for scale in sorted(scales):
        ttft_s = slo["ttft_ms"] / 1000 * (scale if scaled in ("both", "ttft") else 1.0)
        tpot_s = slo["tpot_ms"] / 1000 * (scale if scaled in ("both", "tpot") else 1.0)
        runs: dict[str, list[dict]] = {}
        for (name, rate), reqs in results.items():
            good = sum(r.good(ttft_s, tpot_s) for r in reqs)
            duration = durations.get((name, rate)) or 0.0
            runs.setdefault(name, []).append({
                "offered_rate_rps": rate, "requests": len(reqs), "good": good,
                "slo_attainment": good / len(reqs),
                "goodput_rps": good / duration if duration > 0 else 0.0})
        for r in runs.values():
            r.sort(key=lambda x: x["offered_rate_rps"])
        out["scales"].append({
            "scale": scale, "slo_ttft_ms": round(ttft_s * 1000, 3), "slo_tpot_ms": round(tpot_s * 1000, 3),
            "runs": runs,
            "max_rate_at_attainment_rps": {n: max_rate_at_attainment(r, goal) for n, r in runs.items()},
            "comparison": _compare(setups, runs)})
    return out


def _compare(setups: dict, runs: dict[str, list[dict]]) -> list[dict]:
    """Each disaggregated setup against the colocated setup with the most good requests, per rate."""
    colo = [n for n in runs if setups.get(n, {}).get("mode") == "colocated"]
    disagg = [n for n in runs if setups.get(n, {}).get("mode") == "disaggregated"]
    rows = []
    for d in disagg:
        for run in runs[d]:
            rate = run["offered_rate_rps"]
            base = [(b, r) for b in colo for r in runs[b] if r["offered_rate_rps"] == rate]
            if not base:
                continue
            name, b = max(base, key=lambda x: x[1]["good"])
            ratio = round(run["goodput_rps"] / b["goodput_rps"], 3) if b["goodput_rps"] else None
            rows.append({"rate_rps": rate, "setup": d, "baseline": name,
                         "attainment": round(run["slo_attainment"], 4),
                         "baseline_attainment": round(b["slo_attainment"], 4),
                         "goodput_ratio": ratio})
    return rows


def print_scan(result: dict) -> None:
    goal = 100 * result["attainment_goal"]
    print(f"\ngoodput as the SLOs tighten (scale x {result['scaled']} SLO; run SLOs: TTFT "
          f"{result['slo']['ttft_ms']:g} ms, TPOT {result['slo']['tpot_ms']:g} ms): disaggregated / the colocated "
          "setup with the most good requests, and % of requests within both SLOs")
    for s in result["scales"]:
        print(f"  scale {s['scale']:g} (TTFT {s['slo_ttft_ms']:g} ms, TPOT {s['slo_tpot_ms']:g} ms):")
        for r in s["comparison"]:
            ratio = r["goodput_ratio"]
            shown = ("inf" if r["attainment"] else "-") if ratio is None else f"{ratio:.2f}"
            print(f"    {r['rate_rps']:>5g}/s {r['setup']:>16} vs {r['baseline']:<18} goodput {shown:>5}x "
                  f"({100 * r['attainment']:.0f}% vs {100 * r['baseline_attainment']:.0f}% in SLO)")
        best = ", ".join(f"{n} {v:g}" for n, v in s["max_rate_at_attainment_rps"].items())
        print(f"    DistServe goodput (highest rate with >= {goal:.0f}% in SLO, req/s): {best}")


def main(args) -> int:
    try:
        with open(os.path.join(args.run_dir, "serve.json")) as f:
            report = json.load(f)
        with open(os.path.join(args.run_dir, "serve_requests.json")) as f:
            raw = json.load(f)
        result = scan(report, raw, args.scales, args.scale_slo)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"pdgrpc bench slo-scale: {exc}", file=sys.stderr)
        return 2
    out = args.out or args.run_dir
    os.makedirs(out, exist_ok=True)
    result["run_command"] = report.get("command", "")
    path = os.path.join(out, "slo_scale.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    written = [path]
    if not args.no_plots:
        from pdgrpc.bench.plots import plot_slo_scale, run_title

        written += plot_slo_scale(result, out, run_title(report))
    print_scan(result)
    print("wrote " + ", ".join(written))
    return 0
