"""Plot and tabulate the records of benchmarks/model.py (needs matplotlib, which the package itself does not).

python benchmarks/plot_model.py benchmarks/results/model-h100.json benchmarks/results/model-h100.png
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLES = {"mlx": "-o", "torch": "--s", "torch-canonical": ":^"}


def main(results_path, png_path):
    records = json.loads(Path(results_path).read_text())
    series = defaultdict(list)
    for r in records:
        series[(r["model"], r["dtype"], r["framework"])].append((r["L"], r["tokens_per_s"]))
    models = sorted({r["model"] for r in records})
    dtypes = sorted({r["dtype"] for r in records}, key=["float32", "bfloat16"].index)
    fig, axes = plt.subplots(len(models), len(dtypes), figsize=(5.5 * len(dtypes), 3.8 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            for (m, d, framework), points in sorted(series.items()):
                if (m, d) == (model, dtype):
                    xs, ys = zip(*sorted(points))
                    ax.plot(xs, [y / 1e3 for y in ys], STYLES.get(framework, "-"), label=framework)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{model}, {dtype}")
            ax.set_xlabel("sequence length L (B·L ≈ 16k tokens)")
            ax.set_ylabel("thousand tokens / s")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(
        f"{records[0]['machine']} — " + ", ".join(f"{k} {v}" for k, v in records[0]["versions"].items()), fontsize=8
    )
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    print("| model | L | B | dtype | MLX tokens/s | torch tokens/s | MLX / torch | MLX peak GB | torch peak GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    by_key = {(r["model"], r["L"], r["dtype"], r["framework"]): r for r in records}
    for r in records:
        if r["framework"] != "mlx":
            continue
        t = by_key.get((r["model"], r["L"], r["dtype"], "torch"))
        torch_tps = f"{t['tokens_per_s']:,.0f}" if t else "—"
        torch_mem = f"{t['peak_mem_gb']:.1f}" if t and t["peak_mem_gb"] is not None else "—"
        ratio = f"{r['speedup_vs_torch']:.2f}×" if "speedup_vs_torch" in r else "—"
        print(
            f"| {r['model']} | {r['L']} | {r['B']} | {r['dtype']} | {r['tokens_per_s']:,.0f} | {torch_tps} | {ratio} | "
            f"{r['peak_mem_gb']:.1f} | {torch_mem} |"
        )


if __name__ == "__main__":
    main(*sys.argv[1:3])
