"""PNG plots of a `bench serve` sweep: latency vs request rate, goodput vs request rate."""

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


def plot_sweep(report: dict, out_dir: str, prefix: str = "serve") -> list[str]:
    """Write ``<prefix>_latency.png`` and ``<prefix>_goodput.png``; return their paths."""
    setups = report["setups"]
    if not any(r["offered_rate_rps"] > 0 for s in setups.values() for r in s["runs"]):
        return []  # only one-at-a-time runs: nothing to draw against the rate
    plt = _pyplot()
    title = f"{report['workload']} workload, engine {report['engine']}"
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
