"""`sdtrain plot RUN_DIR...`: one figure, one panel per metric, every run overlaid by name.

Loss (and eval loss) against step and against tokens, tokens/s, memory and gradient norm;
where a run's metrics.jsonl has them, the pipeline bubble (`bubble`), the MoE all-to-all
share of step time (`moe_all_to_all_share`, as the trainer writes it; `all_to_all*` / `a2a*`
from other tools) and the share of MoE token assignments dropped (`moe_dropped`).
"""

from __future__ import annotations

import math

from sdtrain.plot.backend import figure_class
from sdtrain.plot.run_data import Run

# (title, y label, x axis, [(metrics key, legend suffix, line style)])
PANELS = [
    ("loss against step", "loss", "step", [("loss", "", "-"), ("eval_loss", " eval", "--o")]),
    ("loss against tokens", "loss", "tokens", [("loss", "", "-"), ("eval_loss", " eval", "--o")]),
    ("throughput", "tokens/s", "step", [("tokens_per_s", "", "-")]),
    ("memory", "GiB per rank", "step", [("mem_gib", "", "-")]),
    ("gradient norm", "global grad norm (before clipping)", "step", [("grad_norm", "", "-")]),
]
OPTIONAL = [("pipeline bubble", "bubble, fraction of step time", ("bubble",)),
            ("all-to-all share", "all-to-all, fraction of step time", ("moe_all_to_all", "all_to_all", "a2a")),
            ("MoE dropped tokens", "dropped, fraction of assignments", ("moe_dropped",))]


def panels_for(runs: list[Run]) -> list[tuple]:
    panels = list(PANELS)
    present = {key for run in runs for key in run.keys()}
    for title, label, prefixes in OPTIONAL:
        # the first prefix any run has, and its shortest key: `bubble`, not `bubble_formula`
        keys = next((sorted(k for k in present if k.startswith(p)) for p in prefixes
                     if any(k.startswith(p) for k in present)), [])
        if keys:
            panels.append((title, label, "step", [(keys[0], "", "-")]))
    return panels


def runs_figure(runs: list[Run]):
    """The Figure (not yet saved): tests read its axes and legends before it becomes a PNG."""
    panels = panels_for(runs)
    cols = 2
    rows = math.ceil(len(panels) / cols)
    figure = figure_class()(figsize=(12, 3.6 * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).flatten()
    for ax, (title, ylabel, x, series) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("tokens" if x == "tokens" else "step")
        ax.set_ylabel(ylabel)
        drawn = 0
        for index, run in enumerate(runs):
            for key, suffix, style in series:
                xs, ys = run.series(key, x)
                if xs:
                    ax.plot(xs, ys, style, color=f"C{index}", label=f"{run.name}{suffix}", markersize=3)
                    drawn += 1
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data" if x == "step" else "no recipe.yaml with the batch size",
                    ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    figure.suptitle("sdtrain runs: " + ", ".join(run.name for run in runs))
    return figure


def notes(runs: list[Run]) -> list[str]:
    return [f"{run.name}: no recipe.yaml with train.global_batch_size and model.seq_len, so not on the tokens axis"
            for run in runs if run.tokens_per_step is None]
