"""Plot the faithfulness curves that circuit_curves.py prints (its `RESULT {json}` lines, from one or more log
files): faithfulness against the number of nodes (per prompt for per-prompt selections), one line per site set,
selection and error treatment, one panel per task.

    python benchmarks/plot_curves.py runs/*.log --only errors=ablate --out examples/gemma_curves.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_results(paths: list[Path]) -> list[dict]:
    """Every curve line (lines with a "curve") of the logs, in order."""
    rows = []
    for path in paths:
        for line in path.read_text().splitlines():
            if line.startswith("RESULT "):
                row = json.loads(line[len("RESULT "):])
                if "curve" in row:
                    rows.append(row)
    return rows


def label(row: dict) -> str:
    parts = [row["sites"], row["selection"].replace("dataset ", "shared, ")]
    if row.get("errors") == "keep":
        parts.append("errors kept")
    if row.get("ablation", "corrupt") != "corrupt":
        parts.append(f"{row['ablation']} ablation")
    return ", ".join(parts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                   help="keep the lines whose field KEY equals VALUE (repeatable), e.g. errors=ablate")
    args = p.parse_args(argv)
    only = [kv.split("=", 1) for kv in args.only]
    if any(len(kv) != 2 for kv in only):
        raise SystemExit("error: --only takes KEY=VALUE, e.g. --only errors=ablate")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dictcircuits.atomic import save_png

    rows = [r for r in read_results(args.logs) if all(str(r.get(k)) == v for k, v in only)]
    if not rows:
        raise SystemExit("error: no RESULT lines with a curve in " + ", ".join(map(str, args.logs)))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(7.5 * len(tasks), 7.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, row in enumerate(r for r in rows if r["task"] == task):
            sizes = sorted(int(n) for n in row["curve"])
            per = row["selection"].startswith("per-prompt")
            ax.plot(sizes, [row["curve"][str(n)] for n in sizes], marker="o", linestyle="--" if per else "-",
                    color=plt.cm.tab20(i % 20), label=label(row))
        ax.axhline(0.8, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel("nodes (per prompt for per-prompt selections, dashed)")
        ax.set_ylabel("faithfulness (real patching)")
        first = next(r for r in rows if r["task"] == task)
        ax.set_title(f"{first['model']}: {task}, {first['n']} prompts")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.tight_layout()
    print(save_png(fig, args.out))


if __name__ == "__main__":
    main()
