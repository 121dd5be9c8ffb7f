"""The benchmark's outputs: the JSON results, a PNG plot (matplotlib) and a short summary (rich tables).

Workflow: `write(results, out_dir)` writes `agent-<time>.json` and `agent-<time>.png` under `out_dir` and returns
their paths; `summary(results)` returns rich tables: agent against raw per model and scenario (TTFT, decode rate,
mean latency, end-to-end tokens/s, each with its ratio, higher is better for the agent; the end-to-end ratio is judged against
the 0.95 target), the thread sweep with the best settings, and the agent's start-up time and idle memory.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from .scenarios import HEADLINE

TARGET = 0.95
LOAD_COLORS = {"idle": 0, "busy": 2}


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:,.0f}"


def _sec(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}" if v < 1 else f"{v:.2f}"


def _ratio(v: float | None, judged: bool = False) -> str:
    if v is None:
        return "-"
    return f"[{'green' if v >= TARGET else 'red'}]{v:.2f}[/]" if judged else f"{v:.2f}"


def write(results: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"agent-{results['meta']['started'].replace(':', '').replace('-', '')[:15]}"
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, png_path)
    return json_path, png_path


def _comparison_table(results: dict) -> Table:
    t = Table(title="Agent vs raw onnxruntime-genai: medians of interleaved rounds, 'a/r' = agent/raw, "
                    "ratio: higher is better for the agent (times: raw/agent)")
    for col in ("model", "scenario", "TTFT ms a/r", "ratio", "decode tok/s a/r", "ratio", "latency s a/r", "ratio",
                "e2e tok/s a/r", "ratio"):
        t.add_column(col, justify="left" if col in ("model", "scenario") else "right")
    for name, res in results["comparison"].items():
        for k, sc in res["scenarios"].items():
            a, r, q = sc["agent"], sc["raw"], sc["ratios"]
            t.add_row(
                name, k,
                f"{_ms(a['ttft_s'])}/{_ms(r['ttft_s'])}", _ratio(q["ttft_s"]),
                f"{_num(a['decode_tps'])}/{_num(r['decode_tps'])}", _ratio(q["decode_tps"]),
                f"{_sec(a['latency_s'])}/{_sec(r['latency_s'])}", _ratio(q["latency_s"]),
                f"{_num(a[HEADLINE])}/{_num(r[HEADLINE])}", _ratio(q[HEADLINE], judged=True),
            )  # fmt: skip
    return t


def _sweep_tables(sw: dict) -> list[Table]:
    t = Table(title=f"Thread sweep on {sw['model']}: one streaming client; e2e = tokens / request time")
    for col in ("load", "setting", "e2e tok/s raw", "e2e tok/s agent", "decode raw", "decode agent",
                "TTFT ms raw", "TTFT ms agent", "agent threads"):
        t.add_column(col, justify="left" if col in ("load", "setting") else "right")
    for load, cells in sw["loads"].items():
        for c in cells:
            r, a = c["raw"], c["agent"]
            t.add_row(load, c["label"] + (" *" if c.get("disturbed") else ""), _num(r["e2e_tps"]), _num(a["e2e_tps"]), _num(r["decode_tps"]),
                      _num(a["decode_tps"]), _ms(r["ttft_s"]), _ms(a["ttft_s"]), str(c["agent_os_threads"]))
    if any(c.get("disturbed") for cells in sw["loads"].values() for c in cells):
        t.caption = "* other processes took CPU during this cell's requests (see foreign_cores_max in the JSON)"
    best = Table(title="Best thread setting (by e2e tok/s)")
    for col in ("side", "idle", "CPU 0 busy", "robust: best worst case"):
        best.add_column(col)
    for side, ch in sw["choice"].items():
        best.add_row(side, ch["best"]["idle"]["setting"], ch["best"]["busy"]["setting"],
                     f"{ch['robust']} ({ch['worst_case_share'][ch['robust']]:.0%} of the best in its worse load)")
    return [t, best]


def _footprint_table(fp: dict) -> Table:
    t = Table(title="Agent start-up (process start to /health) and idle memory")
    for col in ("case", "/health", "start-up ms (median)", "idle RSS MiB"):
        t.add_column(col, justify="left" if col in ("case", "/health") else "right")
    for name, f in fp.items():
        t.add_row(name, f["health"], _ms(f["startup_median_s"]), _num(f["rss_idle_mb"]))
    return t


def summary(results: dict) -> list[Table]:
    tables = [_comparison_table(results)]
    if results.get("sweep"):
        tables += _sweep_tables(results["sweep"])
    if results.get("footprint"):
        tables.append(_footprint_table(results["footprint"]))
    return tables


def _bars(ax, groups: list[str], series: list[tuple[str, list[float | None], dict]]) -> None:
    """Grouped bars: one group per label in `groups`, one bar per series (label, values, bar keyword args)."""
    width = 0.8 / max(1, len(series))
    for j, (label, values, kw) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [float("nan") if v is None else v for v in values], width, label=label, **kw)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sw = results.get("sweep")
    comp = results["comparison"]
    names = list(comp)
    keys = list(comp[names[0]]["scenarios"]) if names else []
    fig, axes = plt.subplots(1, 3 if sw else 2, figsize=(18 if sw else 12, 5.5), constrained_layout=True)

    ax = axes[0]
    series = []
    for j, name in enumerate(names):
        sc = comp[name]["scenarios"]
        for fig_name, label, hatch in ((HEADLINE, "e2e tok/s", ""), ("latency_s", "latency", ".."), ("ttft_s", "TTFT", "//")):
            series.append((f"{name} {label}", [sc[k]["ratios"][fig_name] for k in keys],
                           {"hatch": hatch, "color": f"C{j}", "alpha": 1.0 if not hatch else 0.6}))
    _bars(ax, keys, series)
    for container in ax.containers:
        values = [bar.get_height() for bar in container]
        labels = ["" if v != v else f"{v:.2f}" for v in values]  # v != v: NaN, a figure this scenario lacks
        ax.bar_label(container, labels=labels, fontsize=6, rotation=90, padding=2)
    ax.axhline(TARGET, color="red", linestyle="--", linewidth=1, label=f"target {TARGET}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    shown = [v for _, values, _ in series for v in values if v is not None]
    if shown:
        ax.set_ylim(max(0.0, min(shown) - 0.15), max(1.1, max(shown) + 0.1))
    ax.set_ylabel("agent vs raw (rates agent/raw, times raw/agent; higher is better)")
    ax.set_title("Agent vs raw: median of per-round ratios")
    ax.legend(fontsize=7, ncol=2, loc="lower right")

    ax = axes[1]
    series = []
    for name in names:
        sc = comp[name]["scenarios"]
        for side, hatch in (("agent", ""), ("raw", "//")):
            series.append((f"{name} {side}", [sc[k][side][HEADLINE] for k in keys], {"hatch": hatch}))
    _bars(ax, keys, series)
    if len(names) > 1:
        ax.set_yscale("log")  # the models' rates differ a hundredfold
    ax.set_ylabel("tokens/s end to end (all tokens / scenario wall time)")
    ax.set_title("Throughput")
    ax.legend(fontsize=7)

    if sw:
        ax = axes[2]
        labels = [c["label"] for c in sw["loads"]["idle"]]
        series = []
        for load, cells in sw["loads"].items():
            for side in ("raw", "agent"):
                color = f"C{LOAD_COLORS.get(load, 0) + (side == 'agent')}"
                series.append((f"{side}, {load}", [c[side]["e2e_tps"] for c in cells],
                               {"hatch": "//" if side == "raw" else "", "color": color}))
        _bars(ax, labels, series)
        ax.set_ylabel("tokens/s end to end, one streaming client")
        ax.set_title(f"Thread sweep on {sw['model']} (busy: CPU 0 held by another process)")
        ax.legend(fontsize=7)

    meta = results["meta"]
    fig.suptitle(f"slmops agent inference benchmark {meta['started']}, {meta['host']['cpus']} CPUs, "
                 f"{'quick' if meta['quick'] else 'full'} run, threads={meta['settings']['threads']} "
                 f"spin={meta['settings']['spin']}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
