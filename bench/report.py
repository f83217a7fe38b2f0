"""What the benchmarks report in common, and the report of a whole run (`python -m bench`).

A `Figure` is one number over repeated runs (median, min..max). A `Result` is one measured figure of
Velesio next to its peer's, the ratio and the DESIGN.md target it is held against. Each benchmark's
`run(argv)` returns an `Outcome` (its results plus its own Markdown report); `write_markdown` and
`write_chart` turn the outcomes of one run into `bench/results/latest.md` and `latest.png`.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO_ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ("velesio", "grpcio", "protobuf", "redis", "llama-cpp-python", "torch", "diffusers", "fastapi")


@dataclass
class Figure:
    """One figure over the repeats: median and spread."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        finite = [v for v in self.values if not math.isnan(v)]
        return statistics.median(finite) if finite else math.nan

    @property
    def low(self) -> float:
        finite = [v for v in self.values if not math.isnan(v)]
        return min(finite) if finite else math.nan

    @property
    def high(self) -> float:
        finite = [v for v in self.values if not math.isnan(v)]
        return max(finite) if finite else math.nan

    def cell(self, digits: int) -> str:
        if not self.values:
            return "n/a"
        if len(self.values) == 1:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}..{self.high:.{digits}f})"


@dataclass(frozen=True)
class Target:
    """A DESIGN.md target: the result's value, its ratio to the peer, or the value minus the peer's
    ("added"), held against a threshold."""

    of: Literal["value", "ratio", "added"]
    op: Literal[">=", "<="]
    threshold: float

    def met(self, measured: float) -> bool | None:
        if math.isnan(measured):
            return None
        return measured >= self.threshold if self.op == ">=" else measured <= self.threshold

    def describe(self, unit: str) -> str:
        if self.of == "ratio":
            return f"{self.op} {self.threshold:g}x peer"
        prefix = "added " if self.of == "added" else ""
        return f"{prefix}{self.op} {self.threshold:g} {unit}".rstrip()


@dataclass
class Result:
    """One figure of Velesio, its peer's in the same run, and the target it answers to (if any)."""

    benchmark: str
    figure: str
    unit: str
    value: Figure
    digits: int = 1
    peer: str = ""
    peer_value: Figure = field(default_factory=Figure)
    ratio: Figure = field(default_factory=Figure)  # per repeat: value / peer_value
    added: Figure = field(default_factory=Figure)  # per repeat: value - peer_value
    target: Target | None = None

    @property
    def is_rate(self) -> bool:
        """Throughput-like (more is better), as opposed to latency, memory or error counts."""
        return self.unit.endswith(("/s", "/min"))

    def judged(self) -> Figure:
        if self.target is None:
            return self.value
        return {"value": self.value, "ratio": self.ratio, "added": self.added}[self.target.of]

    @property
    def verdict(self) -> str:
        """PASS or MISS on the median; "n/a" when not measured; "" when there is no target."""
        if self.target is None:
            return ""
        met = self.target.met(self.judged().median)
        return "n/a" if met is None else "PASS" if met else "MISS"

    def headroom(self) -> float:
        """How far the median is on the good side of the target: > 1 passes (target / value for <=)."""
        if self.target is None:
            return math.nan
        measured, threshold = self.judged().median, self.target.threshold
        if self.target.op == ">=":
            return measured / threshold if threshold else math.nan
        return threshold / measured if measured > 0 else math.inf if measured == 0 else math.nan


@dataclass
class Outcome:
    """What one benchmark returns: its results, its own report, and (load) memory per process in MiB."""

    benchmark: str
    results: list[Result]
    details: str
    memory_mib: dict[str, dict[str, float]] = field(default_factory=dict)


def outcomes_from_json(raw: dict[str, Any]) -> list[Outcome]:
    """The outcomes a run's .json holds (results and load memory; not the Markdown details)."""
    results = []
    for found in raw["results"]:
        figures = {k: Figure(found[k]["values"]) for k in ("value", "peer_value", "ratio", "added")}
        target = Target(**found["target"]) if found.get("target") else None
        results.append(Result(**{**found, **figures, "target": target}))
    return [Outcome("all", results, "", memory_mib=raw.get("memory_mib", {}))]


def callers(count: int, noun: str = "caller") -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def paired(pairs: Sequence[tuple[float, float]]) -> tuple[Figure, Figure, Figure, Figure]:
    """Per-repeat (velesio, peer) pairs as figures: value, peer value, ratio and difference."""
    value, peer, ratio, added = Figure(), Figure(), Figure(), Figure()
    for ours, theirs in pairs:
        value.values.append(ours)
        peer.values.append(theirs)
        ratio.values.append(ours / theirs if theirs else math.nan)
        added.values.append(ours - theirs)
    return value, peer, ratio, added


# -- the machine ------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def cpu_quota() -> str:
    """The cgroup v2 CPU limit, when there is one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return "none"
    return "none" if quota == "max" else f"{int(quota) / int(period):.2f} CPUs"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def git_commit() -> str:
    commit = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    return (
        f"{commit} (with uncommitted changes)"
        if _git("status", "--porcelain", "--untracked-files=no")
        else commit
    )


def machine() -> dict[str, str]:
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    found = {
        "cores": f"{os.cpu_count()} (usable {usable}, cgroup limit {cpu_quota()})",
        "cpu": cpu_model(),
        "ram": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    found |= {package: _version(package) for package in VERSIONS}
    found["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    found["commit"] = git_commit()
    found["load average at start"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return found


# -- the run's report -------------------------------------------------------------------------------


def _row(result: Result) -> str:
    peer = result.peer_value.cell(result.digits) if result.peer_value.values else ""
    ratio = f"{result.ratio.cell(2)}x" if result.ratio.values else ""
    target = result.target.describe(result.unit) if result.target else ""
    if result.target is not None and result.target.of == "added":
        target += f" (added: {result.added.cell(result.digits)})"
    verdict = f"**{result.verdict}**" if result.verdict else ""
    cells = [
        result.benchmark,
        f"{result.figure} ({result.unit})" if result.unit else result.figure,
        result.value.cell(result.digits),
        result.peer,
        peer,
        ratio,
        target,
        verdict,
        str(len(result.value.values)),
    ]
    return "| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |"


def table(outcomes: Sequence[Outcome], failures: dict[str, str]) -> list[str]:
    lines = [
        "| benchmark | figure | Velesio | peer | peer figure | Velesio/peer | DESIGN.md target | result "
        "| runs |",
        "|:---|:---|---:|:---|---:|---:|:---|:---:|---:|",
    ]
    for outcome in outcomes:
        lines += [_row(result) for result in outcome.results]
    for name, reason in failures.items():
        lines.append(f"| {name} | failed: {reason.splitlines()[0][:200] if reason else '?'} | | | | | | | |")
    return lines


def render(
    outcomes: Sequence[Outcome], failures: dict[str, str], info: dict[str, str], profile: str, chart: str
) -> str:
    results = [r for o in outcomes for r in o.results]
    verdicts = [r.verdict for r in results if r.verdict]
    tally = ", ".join(f"{verdicts.count(v)} {v}" for v in ("PASS", "MISS", "n/a") if v in verdicts)
    lines = [
        "# Velesio benchmarks",
        "",
        f"Profile `{profile}`, every benchmark one after another on one machine (`python -m bench"
        f"{' --quick' if profile == 'quick' else ''}`). Figures are the median over repeated runs, with "
        "min..max in brackets; ratios are Velesio / peer per run, peers measured in the same run.",
        "",
        *(f"- {name}: {value}" for name, value in info.items()),
        "",
        *table(outcomes, failures),
        "",
        f"Targets: {tally or 'none judged'}" + (f"; {len(failures)} benchmark(s) failed" if failures else ""),
        "",
        f"![Velesio against its peers and targets]({chart})",
        "",
    ]
    for outcome in outcomes:
        lines += [f"## Details: {outcome.benchmark}", "", _demote(outcome.details).strip(), ""]
    return "\n".join(lines)


def _demote(markdown: str) -> str:
    """The benchmark's own report under this document's headings (its "##" becomes "###")."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def write_markdown(
    path: Path,
    outcomes: Sequence[Outcome],
    failures: dict[str, str],
    info: dict[str, str],
    profile: str,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    chart = path.with_suffix(".png").name
    path.write_text(render(outcomes, failures, info, profile, chart) + "\n")


COLOURS = {"PASS": "tab:green", "MISS": "tab:red", "n/a": "tab:gray", "": "tab:blue"}
HEADROOM_CLIP = 4.0


def write_chart(path: Path, outcomes: Sequence[Outcome], title: str) -> None:
    """Top: throughput of Velesio over its peer's, with the spread and the targets. Middle: every figure
    that has a DESIGN.md target, as how far it is from it. Bottom (when the load benchmark ran): the RSS
    of every process under load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for o in outcomes for r in o.results]
    rates = [r for r in results if r.is_rate and r.ratio.values and not math.isnan(r.ratio.median)]
    judged = [r for r in results if r.target is not None and r.target.threshold > 0]
    memory = next((o.memory_mib for o in outcomes if o.memory_mib), {})
    panels = [(draw, rows) for draw, rows in ((_ratio_panel, rates), (_target_panel, judged)) if rows]
    heights = [len(rows) for _, rows in panels] + ([0.7 * len(memory)] if memory else [])
    fig, axes = plt.subplots(
        max(1, len(heights)),
        1,
        figsize=(11, 1.2 + 0.38 * sum(heights) + 0.9 * len(heights)),
        height_ratios=[max(1.0, h) for h in heights] or None,
        squeeze=False,
        layout="constrained",
    )
    column = iter(axes[:, 0])
    for draw, rows in panels:
        draw(next(column), rows)
    if memory:
        _memory_panel(next(column), memory)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _label(result: Result) -> str:
    """One row's name; a figure held against two peers is two rows, told apart by the peer."""
    peer = f"\nvs {result.peer}" if result.peer else ""
    return f"{result.benchmark}: {result.figure}{peer}"


def _ratio_panel(ax: Any, rates: Sequence[Result]) -> None:
    medians = [r.ratio.median for r in rates]
    below = [m - r.ratio.low for m, r in zip(medians, rates, strict=True)]
    above = [r.ratio.high - m for m, r in zip(medians, rates, strict=True)]
    colours = [COLOURS[r.verdict if r.target and r.target.of == "ratio" else ""] for r in rates]
    # Numeric positions: matplotlib merges bars whose category labels are equal.
    ax.barh(range(len(rates)), medians, xerr=[below, above], color=colours, capsize=3)
    ax.set_yticks(range(len(rates)), [_label(r) for r in rates], fontsize=8)
    for y, result in enumerate(rates):
        if result.target is not None and result.target.of == "ratio":
            ax.plot([result.target.threshold] * 2, [y - 0.45, y + 0.45], color="black", linewidth=2.5)
    ax.axvline(1.0, color="gray", linestyle=":")
    ax.invert_yaxis()
    ax.set_xlabel("throughput, Velesio / peer (median, whiskers min..max; black mark: DESIGN.md target)")


def _target_panel(ax: Any, judged: Sequence[Result]) -> None:
    headroom = [r.headroom() for r in judged]
    shown = [min(h, HEADROOM_CLIP) if not math.isnan(h) else 0.0 for h in headroom]
    ax.barh(range(len(judged)), shown, color=[COLOURS[r.verdict] for r in judged])
    ax.set_yticks(range(len(judged)), [_label(r) for r in judged], fontsize=8)
    for y, (result, value) in enumerate(zip(judged, shown, strict=True)):
        measured = result.judged().median
        text = f" {measured:.3g}{'x' if result.target and result.target.of == 'ratio' else ''} vs "
        text += result.target.describe(result.unit) if result.target else ""
        ax.text(value, y, text, va="center", fontsize=8)
    ax.axvline(1.0, color="black", linewidth=2)
    ax.set_xlim(0, HEADROOM_CLIP * 1.6)
    ax.invert_yaxis()
    ax.set_xlabel(
        "measured / DESIGN.md target (for <= targets: target / measured; > 1 meets it; "
        f"cut at {HEADROOM_CLIP:g})"
    )


def _memory_panel(ax: Any, memory: dict[str, dict[str, float]]) -> None:
    names = list(memory)
    for i, moment in enumerate(("start", "peak", "end")):
        offsets = [y + (i - 1) * 0.27 for y in range(len(names))]
        ax.barh(offsets, [memory[n][moment] for n in names], height=0.27, label=moment)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.legend(loc="lower left", bbox_to_anchor=(1.0, 0.0))
    ax.set_xlabel("load: RSS of every process, MiB, at the start, peak and end of the held streams")
