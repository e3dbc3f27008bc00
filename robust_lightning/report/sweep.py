"""One table for a Hydra multirun: what each job overrode and what it measured, as CSV and Markdown."""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every finished job under ``sweep_dir``: its overrides (``key=value``) and its ``results.json``, in job order."""
    jobs = []
    for results in sorted(sweep_dir.rglob("results.json"), key=lambda p: (len(str(p)), str(p))):
        overrides = OmegaConf.to_container(OmegaConf.load(results.parent / ".hydra" / "overrides.yaml"))
        jobs.append({"overrides": parse_overrides(overrides), "results": json.loads(results.read_text())})
    return jobs


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """``{key: value}`` of Hydra override strings, ``+``/``++`` dropped, a deletion (``~key``) as ``"~"``."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return {o.key_or_group: "~" if o.is_delete() else o.get_value_element_as_str() for o in parsed}


def varying_keys(jobs: list[dict[str, Any]]) -> list[str]:
    """The overridden keys whose value differs between jobs, in the order the overrides name them."""
    keys = list(dict.fromkeys(key for job in jobs for key in job["overrides"]))
    return [k for k in keys if len({job["overrides"].get(k) for job in jobs}) > 1]


def sweep_csv(jobs: list[dict[str, Any]]) -> str:
    """One row per job: each varying override, then every metric it logged, the test metrics first."""
    keys = varying_keys(jobs)
    metrics = list(dict.fromkeys(m for job in jobs for m in job["results"]))
    metrics.sort(key=lambda m: not m.startswith("test/"))  # stable: the rest (drift/...) keep their order
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(keys + metrics)
    for job in jobs:
        writer.writerow([job["overrides"].get(k, "") for k in keys] + [job["results"].get(m, "") for m in metrics])
    return out.getvalue()


def sweep_markdown(jobs: list[dict[str, Any]], metric: str = "test/acc") -> str:
    """``metric`` (in %) with the first varying key down and the second across, averaged over any further keys.

    Example:
        >>> jobs = [{"overrides": {"loss": l, "poison.rate": r, "seed": s}, "results": {"test/acc": a}}
        ...         for l, r, s, a in [("ce", "0.2", "0", 0.9), ("ce", "0.2", "1", 0.8), ("gce", "0.2", "0", 0.95),
        ...                             ("gce", "0.2", "1", 0.97), ("ce", "0.4", "0", 0.7), ("gce", "0.4", "0", 0.9)]]
        >>> print(sweep_markdown(jobs))
        test/acc (%), mean over seed
        | loss | poison.rate=0.2 | poison.rate=0.4 |
        |---|---|---|
        | ce | 85.0 (2 runs) | 70.0 |
        | gce | 96.0 (2 runs) | 90.0 |
    """
    keys = varying_keys(jobs)
    if not keys:  # one job, or jobs that differ in nothing: one row each
        rows = [" ".join(f"{k}={v}" for k, v in job["overrides"].items()) or "(defaults)" for job in jobs]
        cells = [_cell([100 * job["results"][metric]] if metric in job["results"] else None) for job in jobs]
        return "\n".join(
            [f"{metric} (%)", "| run | value |", "|---|---|"] + [f"| {r} | {c} |" for r, c in zip(rows, cells)]
        )
    down, across = keys[0], keys[1] if len(keys) > 1 else None
    rows = list(dict.fromkeys(job["overrides"].get(down) for job in jobs))
    columns = list(dict.fromkeys(job["overrides"].get(across) for job in jobs)) if across else [None]
    cells = {}
    for job in jobs:
        if metric in job["results"]:
            cell = (job["overrides"].get(down), job["overrides"].get(across) if across else None)
            cells.setdefault(cell, []).append(100 * job["results"][metric])
    header = f"{metric} (%)" + (f", mean over {', '.join(keys[2:])}" if len(keys) > 2 else "")
    lines = [header, f"| {down} | " + " | ".join(f"{across}={c}" if across else metric for c in columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for row in rows:
        values = [cells.get((row, c)) for c in columns]
        lines.append(f"| {row} | " + " | ".join(_cell(v) for v in values) + " |")
    return "\n".join(lines)


def _cell(values: list[float] | None) -> str:
    if not values:
        return "—"
    mean = f"{statistics.fmean(values):.1f}"
    return mean if len(values) == 1 else f"{mean} ({len(values)} runs)"


class SweepSummary(Callback):
    """A Hydra callback: after a multirun, write ``summary.csv`` and ``summary.md`` into its sweep folder.

    Every job of ``robust-lightning`` leaves a ``results.json``; this gathers them with each job's
    overrides, so it works with any launcher. The base config installs it for every multirun.
    """

    def __init__(self, metric: str = "test/acc") -> None:
        self.metric = metric

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = collect_jobs(sweep_dir)
        if not jobs:
            log.warning("No job of the sweep in %s left a results.json; no summary written.", sweep_dir)
            return
        (sweep_dir / "summary.csv").write_text(sweep_csv(jobs))
        table = sweep_markdown(jobs, self.metric)
        (sweep_dir / "summary.md").write_text(table + "\n")
        print(f"\nSweep of {len(jobs)} runs:\n{table}\nSummary: {sweep_dir.resolve() / 'summary.md'} and summary.csv")
