"""PNG plots of the benchmarks: latency and goodput vs request rate (`bench serve`), attainment vs SLO
scale (`bench slo-scale`), served rate and CPU per request (`bench coordinator`)."""

from __future__ import annotations

import os


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _series(runs: list[dict], metric: str, q: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in sorted(runs, key=lambda r: r["offered_rate_rps"]):
        v = r[metric].get(q) if isinstance(r.get(metric), dict) else r.get(metric)
        if r["offered_rate_rps"] > 0 and v is not None:
            xs.append(r["offered_rate_rps"])
            ys.append(v)
    return xs, ys


def run_title(report: dict) -> str:
    """What a `bench serve` run measured, for plot titles."""
    return f"{report.get('workload', '')} workload, engine {report.get('engine', '')}"


def plot_sweep(report: dict, out_dir: str, prefix: str = "serve") -> list[str]:
    """Write ``<prefix>_latency.png`` and ``<prefix>_goodput.png``; return their paths."""
    setups = report["setups"]
    if not any(r["offered_rate_rps"] > 0 for s in setups.values() for r in s["runs"]):
        return []  # only one-at-a-time runs: nothing to draw against the rate
    plt = _pyplot()
    title = run_title(report)
    paths = []

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for ax, (metric, label) in zip(axes.flat, [("ttft_ms", "TTFT"), ("tpot_ms", "time per output token"),
                                                ("itl_ms", "inter-token latency"), ("e2e_ms", "end-to-end latency")]):
        for i, (name, s) in enumerate(setups.items()):
            color = f"C{i}"
            for q, style in (("p50", "-"), ("p99", "--")):
                xs, ys = _series(s["runs"], metric, q)
                if xs:
                    ax.plot(xs, ys, style, marker="o", color=color, label=f"{name} {q}")
        slo = report.get("slo", {}).get(metric)
        if slo:
            ax.axhline(slo, color="gray", linewidth=0.8, linestyle=":", label="SLO")
        ax.set_title(label)
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("request rate (req/s, Poisson)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Latency vs request rate: {title}")
    fig.tight_layout()
    path = os.path.join(out_dir, f"{prefix}_latency.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, s) in enumerate(setups.items()):
        xs, ys = _series(s["runs"], "goodput_rps", "")
        if xs:
            axes[0].plot(xs, ys, "-", marker="o", color=f"C{i}", label=f"{name} goodput")
        xs, ys = _series(s["runs"], "throughput_rps", "")
        if xs:
            axes[0].plot(xs, ys, ":", color=f"C{i}", label=f"{name} throughput")
        xs, ys = _series(s["runs"], "slo_attainment", "")
        if xs:
            axes[1].plot(xs, [y * 100 for y in ys], "-", marker="o", color=f"C{i}", label=name)
    lim = max((r["offered_rate_rps"] for s in setups.values() for r in s["runs"]), default=1)
    axes[0].plot([0, lim], [0, lim], color="gray", linewidth=0.6, linestyle=":", label="offered")
    axes[0].set_ylabel("requests/s")
    axes[0].set_title("goodput (TTFT and TPOT within SLO)")
    axes[1].axhline(report.get("attainment_goal", 0.9) * 100, color="gray", linewidth=0.8, linestyle=":")
    axes[1].set_ylabel("% of requests within both SLOs")
    axes[1].set_ylim(0, 105)
    axes[1].set_title("SLO attainment")
    for ax in axes:
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Goodput vs request rate: {title}")
    fig.tight_layout()
    path = os.path.join(out_dir, f"{prefix}_goodput.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths


def plot_coordinator(report: dict, out_dir: str) -> list[str]:
    """``coordinator.png`` of a `bench coordinator` sweep: served rate and latency against the offered
    rate, and each process's CPU per request (what limits the rate); [] with no runs."""
    runs = sorted(report["runs"], key=lambda r: r["offered_rate_rps"])
    if not runs:
        return []
    plt = _pyplot()
    rates = [r["offered_rate_rps"] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].plot(rates, [r["throughput_rps"] for r in runs], "-", marker="o", label="served")
    axes[0].plot([0, rates[-1]], [0, rates[-1]], color="gray", linewidth=0.6, linestyle=":", label="offered")
    axes[0].set_ylabel("requests/s")
    axes[0].set_title("served rate")
    for i, (metric, label) in enumerate((("e2e_ms", "end-to-end"), ("ttft_ms", "TTFT"),
                                         ("ttft_minus_prefill_ms", "TTFT - prefill"))):
        for q, style in (("p50", "-"), ("p99", "--")):
            xs, ys = _series(runs, metric, q)
            if xs:
                axes[1].plot(xs, ys, style, marker="o", color=f"C{i}", label=f"{label} {q}")
    axes[1].axhline(report.get("p99_limit_ms", 10.0), color="gray", linewidth=0.8, linestyle=":", label="limit")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("ms")
    axes[1].set_title("latency a request adds")
    names = sorted({p for r in runs for p in r.get("cpu_ms_per_request", {})})
    bottom = [0.0] * len(runs)
    width = 0.6 * min((b - a for a, b in zip(rates, rates[1:])), default=rates[0] or 1.0)
    for i, name in enumerate(names):
        ms = [r.get("cpu_ms_per_request", {}).get(name, 0.0) for r in runs]
        axes[2].bar(rates, ms, width, bottom=bottom, color=f"C{i}", label=name)
        bottom = [b + m for b, m in zip(bottom, ms)]
    axes[2].set_ylabel("CPU ms per request")
    axes[2].set_title("CPU per request, by process")
    for ax in axes:
        ax.set_xlabel("offered rate (req/s, Poisson)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Coordinator overhead: {report.get('output_tokens')} output tokens a request, "
                 f"{report.get('stream_interval', 1)} token(s) a message; {report.get('setup', '')}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, "coordinator.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def plot_slo_scale(result: dict, out_dir: str, title: str = "") -> list[str]:
    """``slo_scale.png`` of `bench slo-scale`: attainment against the SLO scale, one panel per rate;
    [] with nothing to draw."""
    scales = result["scales"]
    rates = sorted({r["offered_rate_rps"] for s in scales for runs in s["runs"].values() for r in runs})
    if not rates:
        return []
    plt = _pyplot()
    names = sorted({n for s in scales for n in s["runs"]})
    fig, axes = plt.subplots(1, len(rates), figsize=(3.6 * len(rates) + 1, 3.8), sharey=True, squeeze=False)
    for ax, rate in zip(axes[0], rates):
        for i, name in enumerate(names):
            xs, ys = [], []
            for s in scales:
                hit = next((r for r in s["runs"].get(name, []) if r["offered_rate_rps"] == rate), None)
                if hit:
                    xs.append(s["scale"])
                    ys.append(100 * hit["slo_attainment"])
            ax.plot(xs, ys, "-", marker="o", color=f"C{i}", label=name)
        ax.axhline(100 * result["attainment_goal"], color="gray", linewidth=0.8, linestyle=":")
        ax.set_title(f"{rate:g} req/s")
        ax.set_xlabel(f"SLO scale ({result['scaled']})")
        ax.set_ylim(0, 105)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("% of requests within both SLOs")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"SLO attainment as the SLOs tighten{': ' + title if title else ''}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, "slo_scale.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
