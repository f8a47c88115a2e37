"""What a sweep leaves in its folder: trials.csv and trials.md (every trial, Optuna's state names), and PNG plots: the
objective against trainable parameters and against training time (a colour and marker per method, pruned and failed
trials hollow, the Pareto front of the completed ones), and the parameters' importances (Optuna's plot)."""
from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

COSTS = ("trainable_parameters", "peak_memory_mb", "tokens_per_s", "train_s", "wall_s")


def rows(trials: list, config) -> tuple[list[str], list[dict]]:
    header = ["trial", "state", *config.space, config.objective, *COSTS, "reason"]
    table = []
    for t in sorted(trials, key=lambda t: t.number):
        row = {"trial": t.number, "state": t.state.name, config.objective: t.value if t.values else None,
               **{name: t.params.get(name) for name in config.space},
               **{name: t.user_attrs.get(name) for name in (*COSTS, "reason")}}
        table.append(row)
    return header, table


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/")


def write_tables(trials: list, config, folder: Path, best: int | None) -> None:
    """trials.csv and trials.md; the row of trial number `best` is marked in the Markdown."""
    header, table = rows(trials, config)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    replace(folder / "trials.csv", out.getvalue())
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        mark = " (best)" if row["trial"] == best else ""
        lines.append("| " + " | ".join(cell(row[h]) + (mark if h == "trial" else "") for h in header) + " |")
    replace(folder / "trials.md", "\n".join(lines) + "\n")


def replace(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a temporary file beside it, renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def plot_sweep(study: optuna.Study, config, folder: Path) -> list[str]:
    """The PNGs written into `folder` (a plot needs two trials with the cost, importances two completed trials and a
    parameter that varied)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for cost, label, name in (("trainable_parameters", "trainable parameters", "metric_vs_trainable_parameters"),
                              ("train_s", "training time (s)", "metric_vs_wall_time")):
        if sum(t.user_attrs.get(cost) is not None for t in trials) < 2:
            continue
        save(metric_against(trials, config, cost, label, plt), folder / f"{name}.png", plt)
        written.append(f"{name}.png")
    varied = {name for name in config.space if len({str(t.params.get(name)) for t in complete}) > 1}
    if len(complete) >= 2 and varied:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
            try:
                ax = plots.plot_param_importances(study, target_name=config.objective)
            except (RuntimeError, ValueError):  # too few trials sharing a parameter to weigh it
                ax = None
        if ax is not None:
            ax.set_title(f"What moved {config.objective} ({len(complete)} completed trials)", loc="left")
            if len(complete) < 10:
                ax.figure.text(0.01, 0.01, f"only {len(complete)} trials completed: importances this few are rough",
                               color="#a00", fontsize=8)
            save(ax, folder / "param_importances.png", plt)
            written.append("param_importances.png")
    return written


def objective_label(config) -> str:
    return f"{config.objective}, {'lower' if config.direction == 'minimize' else 'higher'} is better"


def metric_against(trials: list, config, cost: str, label: str, plt):
    """The objective (y) against a cost (x): a colour and marker per method, completed trials filled, pruned and
    failed ones hollow at their last reported value (or at the plot's worst edge where they reported none), and the
    Pareto front of the completed ones (no other is both cheaper and better)."""
    fig, ax = plt.subplots()
    minimize = config.direction == "minimize"
    costed = [t for t in trials if t.user_attrs.get(cost) is not None]
    reached = [t.value if t.state == TrialState.COMPLETE else
               (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None) for t in costed]
    known = [v for v in reached if v is not None]
    edge = (max(known) if minimize else min(known)) if known else 0.0
    methods = sorted({str(t.params.get("method", config.train.get("method", "lora"))) for t in costed})
    styles = dict(zip(methods, zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3, "osD^vP*Xph")))
    for method in methods:
        color, marker = styles[method]
        for done in (True, False):
            points = [(t.user_attrs[cost], v if v is not None else edge) for t, v in zip(costed, reached)
                      if str(t.params.get("method", config.train.get("method", "lora"))) == method
                      and (t.state == TrialState.COMPLETE) == done]
            if points:
                ax.scatter(*zip(*points), marker=marker, s=45, color=color if done else "none", edgecolors=color,
                           label=method if done else f"{method}, pruned or failed")
    front, best = [], None
    for x, y in sorted((t.user_attrs[cost], t.value) for t in costed if t.state == TrialState.COMPLETE):
        if best is None or (y < best if minimize else y > best):
            front.append((x, y))
            best = y
    if len(front) > 1:
        ax.plot(*zip(*front), color="#555", linewidth=1, drawstyle="steps-post", label="Pareto front", zorder=0)
    if cost == "trainable_parameters":
        ax.set_xscale("log")  # methods differ by orders of magnitude
    ax.set_xlabel(label)
    ax.set_ylabel(objective_label(config))
    ax.set_title(f"{config.objective} against {label}")
    ax.legend(fontsize=8)
    return ax


def save(ax, path: Path, plt) -> None:
    figure = ax.figure
    figure.set_size_inches(7, 4.5)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
