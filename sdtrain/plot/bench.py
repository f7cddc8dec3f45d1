"""`sdtrain bench ... --plot FILE.png`: the bench table as bars, each sdtrain strategy with
the peers that implement the same stage (and pipeline depth) at the same world size beside it.

Two panels: tokens/s (higher is better) and peak memory per rank (the largest rank's).
Peers keep one colour across groups (deepspeed-z1..z3 are all "deepspeed"; fsdp2-keep and
fsdp2-reshard are "fsdp2", the peers of stages 2 and 3; deepspeed-pipe-pp2 and -pp4 are
"deepspeed-pipe").
"""

from __future__ import annotations

import re

from sdtrain.plot.backend import figure_class

SDTRAIN = "sdtrain"


def family(peer_name: str) -> str:
    return re.sub(r"(-pp\d+)?(-(z\d|keep|reshard))?$", "", peer_name)


def groups(results: dict) -> list[tuple[str, list[tuple[str, dict]]]]:
    """[(group label, [(series, row)])]: each sdtrain row, then its peers."""
    rows = results["results"]
    out = []
    for row in rows:
        if row["kind"] != "sdtrain":
            continue
        peers = [(family(p["name"]), p) for p in rows if p["kind"] == "peer"
                 and p["world_size"] == row["world_size"] and p["zero_stage"] == row["zero_stage"]
                 and p.get("pipeline_stages", 1) == row.get("pipeline_stages", 1)]
        out.append((f"{row['name']}\n{row['world_size']} rank{'s' if row['world_size'] > 1 else ''}", [(SDTRAIN, row), *peers]))
    return out


def bench_figure(results: dict):
    """The Figure (not yet saved): bars of tokens/s and peak memory per rank, peers beside."""
    bars = groups(results)
    series = list(dict.fromkeys(name for _, members in bars for name, _ in members))
    colour = {name: f"C{i}" for i, name in enumerate(series)}
    figure = figure_class()(figsize=(max(7, 1.6 * len(bars) + 3), 7.5), layout="constrained")
    top, bottom = figure.subplots(2, 1)
    panels = ((top, "tokens/s", lambda r: r["tokens_per_s"]),
              (bottom, "peak memory per rank, GiB", lambda r: max(r["peak_mem_gib"] or [0])))
    width = 0.8 / max(len(series), 1)
    for ax, ylabel, value in panels:
        labelled = set()
        for position, (_, members) in enumerate(bars):
            start = position - width * (len(members) - 1) / 2
            for offset, (name, row) in enumerate(members):
                label = None if name in labelled else name
                labelled.add(name)
                ax.bar(start + offset * width, value(row), width, color=colour[name], label=label)
        ax.set_xticks(range(len(bars)), [label for label, _ in bars])
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    top.set_title(f"sdtrain bench: {results['recipe']}, {results['precision']}, {results['steps']} steps, "
                  f"best of {results['repeats']}")
    return figure
