"""Markdown report and plots from a suite's records. Every figure comes from a
record in RESULTS_DIR (suite.json and runs/*/record.json)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from harness.errors import HarnessError  # noqa: E402
from harness.records import read_suite_records  # noqa: E402


def runs_table(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        rows.append({
            "model": r["model"]["name"],
            "adapter": r["model"]["adapter"],
            "seed": r["seed"],
            "params": r["parameters"]["total"],
            "fwd FLOPs/byte": r["flops_per_byte"]["analytic"]["total"],
            "train FLOPs": r["training_flops"],
            "bytes seen": r["bytes_seen"],
            "epochs": r["epochs"],
            "val bpb": r["val"]["bpb"],
            "test bpb": r["test"]["bpb"],
            "bytes/unit": r["bytes_per_unit"],
            "wall s": r["wall_seconds"],
            "FLOP/s": r["achieved_flops_per_s"],
            "MFU": r["mfu"],
        })
    return pd.DataFrame(rows).sort_values(["train FLOPs", "test bpb"], kind="stable")


def _markdown(frame: pd.DataFrame) -> str:
    formats = {
        "params": "{:,.0f}", "fwd FLOPs/byte": "{:.3g}", "train FLOPs": "{:.3g}", "bytes seen": "{:,.0f}",
        "epochs": "{:.2f}", "val bpb": "{:.4f}", "test bpb": "{:.4f}", "bytes/unit": "{:.2f}", "wall s": "{:.1f}",
        "FLOP/s": "{:.3g}", "MFU": "{:.1%}", "bpb": "{:.4f}",
    }
    shown = frame.copy()
    for column, fmt in formats.items():
        if column in shown:
            shown[column] = shown[column].map(lambda v, fmt=fmt: fmt.format(v) if pd.notna(v) else "")
    return shown.to_markdown(index=False)


def plot_bpb_vs_flops(records: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    frame = pd.DataFrame([{"model": r["model"]["name"], "flops": r["budget_flops"], "bpb": r["test"]["bpb"]} for r in records])
    for model, group in frame.groupby("model"):
        mean = group.groupby("flops")["bpb"].mean()
        ax.plot(mean.index, mean.values, marker="o", label=model)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("test bits per byte")
    ax.set_title("test bpb against training compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_learning_curves(records: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in records:
        curve = r["loss_curve"]
        ax.plot([p["bytes"] for p in curve], [p["train_bpb"] for p in curve], label=r["run_id"], linewidth=1)
    ax.set_xlabel("training bytes seen")
    ax.set_ylabel("train bits per byte")
    ax.set_title("learning curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_report(results_dir: Path, report_dir: Path) -> str:
    """The markdown report; its plots are written to report_dir/plots, the folder
    the markdown will sit in (so its image links are relative)."""
    suite_file = results_dir / "suite.json"
    if not suite_file.exists():
        raise HarnessError(f"{results_dir}: no suite.json (run `harness run SUITE` first)")
    suite = json.loads(suite_file.read_text())
    records = read_suite_records(results_dir)
    if not records:
        raise HarnessError(f"{results_dir}: no finished runs yet")
    plot_dir = report_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    plot_bpb_vs_flops(records, plot_dir / "bpb_vs_flops.png")
    plot_learning_curves(records, plot_dir / "learning_curves.png")

    refs = suite["references"]
    reference = pd.DataFrame(
        [{"reference": name, "bpb": bpb} for name, bpb in refs["test"]["compressors_bpb"].items()]
        + [{"reference": "order-0 entropy of the test windows", "bpb": refs["test"]["order0_entropy_bpb"]}]
    )
    variants = [
        {"run": r["run_id"], "rule": name, "test bpb": v["bpb"], "note": v["label"]}
        for r in records for name, v in r.get("test_variants", {}).items()
    ]
    spec = suite["suite"]
    lines = [
        f"# Suite `{spec['name']}`",
        "",
        spec.get("description") or "",
        "",
        f"Corpus `{suite['corpus']['id']}` (sha256 `{suite['corpus']['sha256'][:16]}…`); split "
        f"{spec['split']['train_bytes']:,} / {spec['split']['val_bytes']:,} / {spec['split']['test_bytes']:,} bytes; "
        f"{refs['windows']} test windows of {refs['window']} bytes, each scored from an empty context. "
        f"Device `{suite['device']}`, measured fp32 matmul peak {suite['matmul_peak_flops_per_s']:.3g} FLOP/s (MFU is relative to it).",
        "",
        "FLOPs: a multiply-add is 2; every matrix product counts (head and both attention products); "
        "training = 3 x forward. bpb = summed NLL in nats / (ln 2 x scored bytes).",
        "",
        "## Runs",
        "",
        _markdown(runs_table(records)),
        "",
        "## Reference rows (same test windows, each compressed on its own)",
        "",
        _markdown(reference),
        "",
    ]
    if variants:
        lines += ["## Other evaluation rules", "", _markdown(pd.DataFrame(variants)), ""]
    lines += [
        "## Plots",
        "",
        "![test bpb against training FLOPs](plots/bpb_vs_flops.png)",
        "",
        "![learning curves](plots/learning_curves.png)",
        "",
    ]
    return "\n".join(lines)
