"""Readers for the deployment files: Dockerfiles, `tandem serve` flags, PromQL metric names."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from server import cli as serving


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, rest of the line)

    def all(self, instruction: str) -> list[str]:
        return [rest for ins, rest in self.instructions if ins == instruction]

    def last(self, instruction: str) -> str | None:
        found = self.all(instruction)
        return found[-1] if found else None


def dockerfile_stages(path: Path) -> list[Stage]:
    """The stages of a Dockerfile, each with its instructions (comments dropped, continuation lines joined)."""
    lines, pending = [], ""
    for raw in path.read_text().splitlines():
        if not pending and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw.strip())
        pending = ""
    stages: list[Stage] = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            words = rest.split()
            stages.append(Stage(words[0], words[2] if len(words) > 2 and words[1].upper() == "AS" else ""))
        else:
            stages[-1].instructions.append((instruction, rest))
    return stages


def exec_form(rest: str) -> list[str]:
    """The JSON array of an exec-form ENTRYPOINT, CMD or HEALTHCHECK CMD; AssertionError for the shell form."""
    assert rest.startswith("["), f"not the exec form (a JSON array): {rest}"
    return json.loads(rest)


def copy_sources(rest: str) -> list[str]:
    """The source paths of a COPY (options such as --chmod and --from dropped; the last word is the target)."""
    words = [w for w in shlex.split(rest) if not w.startswith("--")]
    return words[:-1]


def parse_serve_flags(flags: list[str]) -> argparse.Namespace:
    """Parse flags exactly as `tandem serve` does; AssertionError naming the flags if it would refuse them."""
    parser = argparse.ArgumentParser(prog="tandem")
    serving.register(parser.add_subparsers())
    try:
        return parser.parse_args(["serve", *flags])
    except SystemExit:
        raise AssertionError(f"`tandem serve` refuses these flags: {flags}") from None


_FUNCTIONS_AND_KEYWORDS = {
    # PromQL aggregation operators, keywords and functions that can stand without "(" directly after them
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset", "inf",
    "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, label names, label values or durations).

    Grafana's label_values(metric, label) counts as a selector of `metric`.
    """
    expr = re.sub(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?\s*,[^)]*\)", r"\1", expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', "", expr)  # strings (label values, regexes)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables ($job, $__rate_interval)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", expr):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _FUNCTIONS_AND_KEYWORDS or re.fullmatch(r"\d+[smhdwy]", name):
            continue
        names.add(name)
    return names
