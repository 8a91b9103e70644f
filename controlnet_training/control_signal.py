"""The control-adherence record of a run (framework-neutral): control_metrics.jsonl, one line per validation with the
training loss, held-out loss and control gain, its plot, and a printout of the curve. What the numbers mean and how
they are measured: torch_training/control_signal.py."""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "control_metrics.jsonl"
PLOT_FILE = "control_metrics.png"


def append_metrics(output_dir: str | Path, record: dict) -> None:
    """Add a record; one record per step (a resumed run that re-measures a step replaces it)."""
    records = [r for r in read_metrics(output_dir) if r["step"] != record["step"]] + [record]
    _write_metrics(output_dir, sorted(records, key=lambda r: r["step"]))


def _write_metrics(output_dir: str | Path, records: list[dict]) -> None:
    (Path(output_dir) / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(output_dir: str | Path, last_step: int) -> None:
    """On resume from `last_step`, forget records of steps the interrupted run made after its checkpoint."""
    _write_metrics(output_dir, [r for r in read_metrics(output_dir) if r["step"] <= last_step])


def plot_metrics(output_dir: str | Path) -> Path | None:
    """control_metrics.png: train and held-out loss, and the control gain, against the step."""
    records = read_metrics(output_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (loss_ax, gain_ax) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    trained = [(r["step"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    if trained:
        loss_ax.plot(*zip(*trained, strict=True), marker=".", label="train loss (mean since previous point)")
    loss_ax.plot(steps, [r["heldout_loss"] for r in records], marker="o", label="held-out loss (own control)")
    loss_ax.set_ylabel("denoising loss")
    loss_ax.legend()
    gain_ax.plot(steps, [r["control_gain"] for r in records], marker="o", color="tab:green", label="weights")
    if "control_gain_ema" in records[-1]:  # --use_ema
        loss_ax.plot(steps, [r.get("heldout_loss_ema") for r in records], marker="x", label="held-out loss (EMA)")
        gain_ax.plot(steps, [r.get("control_gain_ema") for r in records], marker="x", color="tab:olive", label="EMA")
        gain_ax.legend()
    gain_ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    gain_ax.set_ylabel("control gain")
    gain_ax.set_xlabel("optimizer step")
    fig.suptitle("control adherence on held-out rows")
    fig.tight_layout()
    path = Path(output_dir) / PLOT_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    """Print the control-adherence curve of a run: python -m controlnet_training.control_signal OUTPUT_DIR"""
    import sys

    output_dir = (argv if argv is not None else sys.argv[1:])[0]
    records = read_metrics(output_dir)
    if not records:
        raise SystemExit(f"no {METRICS_FILE} in {output_dir} (the run had no held-out rows)")
    ema = "control_gain_ema" in records[-1]  # --use_ema: the average's columns too
    header = f"{'step':>7} {'train loss':>11} {'held-out loss':>14} {'control gain':>13}"
    print(header + (f" {'held-out (EMA)':>15} {'gain (EMA)':>11}" if ema else ""))
    for r in records:
        train = "" if r.get("train_loss") is None else f"{r['train_loss']:.5f}"
        line = f"{r['step']:>7} {train:>11} {r['heldout_loss']:>14.5f} {r['control_gain']:>13.4f}"
        if ema and "control_gain_ema" in r:
            line += f" {r['heldout_loss_ema']:>15.5f} {r['control_gain_ema']:>11.4f}"
        print(line)
    first, last = records[0], records[-1]
    summary = (
        f"control gain {first['control_gain']:.4f} at step {first['step']} -> {last['control_gain']:.4f} "
        f"at step {last['step']}"
    )
    if ema:
        summary += f" (EMA weights: {last['control_gain_ema']:.4f})"
    print(f"{summary}; plot: {Path(output_dir) / PLOT_FILE}")


if __name__ == "__main__":
    main()
