"""What a sweep leaves in its folder: trials.csv and trials.md (every trial, Optuna's state names), and PNG plots drawn
by Optuna's matplotlib visualisations: the metric against trainable parameters and against wall time (each with its
Pareto front marked), and the parameters' importances."""
from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

COSTS = ("trainable_parameters", "peak_memory_mb", "tokens_per_s", "wall_s")


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
    """The PNGs written into `folder` (a plot needs two completed trials, importances a parameter that varied)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
        for cost, label, name in (("trainable_parameters", "trainable parameters", "metric_vs_trainable_parameters"),
                                  ("wall_s", "wall time (s)", "metric_vs_wall_time")):
            costed = [t for t in complete if t.user_attrs.get(cost) is not None]
            if len(costed) < 2:
                continue
            view = optuna.create_study(directions=[config.direction, "minimize"])  # the front of (metric, cost)
            view.add_trials([optuna.trial.create_trial(values=[t.value, t.user_attrs[cost]], params=t.params,
                                                       distributions=t.distributions) for t in costed])
            ax = plots.plot_pareto_front(view, target_names=[config.objective, label])
            ax.set_title(f"{config.objective} against {label}")
            handles, labels = ax.get_legend_handles_labels()
            ax.legend(handles, [{"Trial": "dominated", "Best Trial": "Pareto front"}.get(n, n) for n in labels])
            if cost == "trainable_parameters":
                ax.set_yscale("log")  # methods differ by orders of magnitude
            save(ax, folder / f"{name}.png", plt)
            written.append(f"{name}.png")
        varied = {name for name in config.space if len({str(t.params.get(name)) for t in complete}) > 1}
        if len(complete) >= 2 and varied:
            try:
                save(plots.plot_param_importances(study), folder / "param_importances.png", plt)
                written.append("param_importances.png")
            except (RuntimeError, ValueError):  # too few trials sharing a parameter to weigh it
                pass
    return written


def save(ax, path: Path, plt) -> None:
    figure = ax.figure
    figure.set_size_inches(7, 4.5)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
