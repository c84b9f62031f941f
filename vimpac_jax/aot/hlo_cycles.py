"""Per-instruction profile of a compiled TPU program from XLA's cost model, without hardware.

A TPU executable compiled by libtpu (`jax.jit(f).lower(...).compile().as_text()`) carries, in
each instruction's `backend_config`, the cost model's `"estimated_cycles":"N"`, and in its
`metadata={op_name="jit(step)/transpose(jvp(...))/backbone/layer_3/attn_0/..."}` the JAX
operation it came from. Summing the estimates of the ENTRY computation's instructions gives the
cost model's step time in cycles; grouping them by source operation (layer indices folded, so
the 24 layers of a model are one row) shows where the time goes:

    report = cycle_report(compiled.as_text())
    print(format_report(report, top=20, clock_hz=chips.CHIPS["v5p"].clock_hz))

What it counts and what it does not:
- Only the ENTRY computation's instructions: a fusion's estimate covers its fused computation,
  so counting the fused instructions too would count them twice. A `while` (a `jax.lax.scan`,
  e.g. `model.scan_layers=True`) or `conditional` is one entry instruction: whether its estimate
  covers every trip of the loop is the cost model's business, not visible here; compare with the
  unrolled program before trusting a scanned one.
- Instructions with no estimate (parameters, tuples, custom-calls such as a Pallas kernel or the
  `rbg` RNG's `X64Combine`) are counted by opcode in `CycleReport.without_estimate`, not guessed.
- The text format is XLA's HLO printer's (`name = shape opcode(operands), attr=...`), with or
  without the `%` before names; nothing else of the module is interpreted.
"""

from __future__ import annotations

import collections
import dataclasses
import re

_ASSIGN = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[^\s=]+)\s*=\s*(?P<rest>.*)$")
_OPCODE = re.compile(r"\s*(?P<opcode>[A-Za-z][\w\-]*)\(")
_CYCLES = re.compile(r'"estimated_cycles"\s*:\s*"?(?P<cycles>\d+)"?')
_OP_NAME = re.compile(r'op_name="(?P<op_name>(?:[^"\\]|\\.)*)"')
_LAYER_INDEX = re.compile(r"\b(layer|block|layers)_\d+\b")
_JIT_PREFIX = re.compile(r"^(?:jit\([^)]*\)/)+")
_FUSION_KIND = re.compile(r"\bkind=(?P<kind>k\w+)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One instruction of the ENTRY computation."""

    name: str
    opcode: str  # a fusion's with its kind: "fusion:kLoop", "fusion:kOutput", ...
    op_name: str  # the JAX source op (metadata op_name), "" when the instruction has none
    estimated_cycles: int | None  # None when the cost model gave no estimate


@dataclasses.dataclass(frozen=True)
class CycleReport:
    """Estimated cycles of the ENTRY computation, summed and grouped (groups: largest first)."""

    total_cycles: int
    num_estimated: int  # instructions with an estimate
    without_estimate: dict[str, int]  # opcode -> count of instructions without one
    by_source: list[tuple[str, int]]  # (source op, layer indices folded, cut to `depth` parts), cycles
    by_opcode: list[tuple[str, int]]  # (opcode, a fusion's with its kind), cycles

    def seconds(self, clock_hz: float) -> float:
        """The summed estimate as a time at the chip's clock."""
        return self.total_cycles / clock_hz


def _shape_end(rest: str) -> int:
    """Index just past the result shape at the start of `rest` (a tuple shape has spaces)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return i + 1
        return len(rest)
    space = rest.find(" ")
    return len(rest) if space < 0 else space


def entry_instructions(hlo_text: str) -> list[Instruction]:
    """The instructions of the module's ENTRY computation, in order.

    Raises ValueError when the text has no ENTRY computation (not an HLO module's text)."""
    lines = hlo_text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("ENTRY ")), None)
    if start is None:
        raise ValueError("no ENTRY computation in the HLO text (expected a compiled module's as_text())")
    instructions = []
    for line in lines[start + 1:]:
        if line.startswith("}"):
            break
        assign = _ASSIGN.match(line)
        if not assign:
            continue
        rest = assign["rest"]
        opcode = _OPCODE.match(rest[_shape_end(rest):])
        if not opcode:
            continue
        kind = _FUSION_KIND.search(rest) if opcode["opcode"] == "fusion" else None
        cycles = _CYCLES.search(line)
        op_name = _OP_NAME.search(line)
        instructions.append(Instruction(
            name=assign["name"], opcode=f"fusion:{kind['kind']}" if kind else opcode["opcode"],
            op_name=op_name["op_name"] if op_name else "",
            estimated_cycles=int(cycles["cycles"]) if cycles else None))
    return instructions


def source_key(op_name: str, depth: int = 5) -> str:
    """The group of a source op: the `jit(...)/` prefix dropped, layer indices folded
    (`layer_3` -> `layer_*`), cut to its first `depth` path parts."""
    name = _LAYER_INDEX.sub(lambda m: m.group(1) + "_*", _JIT_PREFIX.sub("", op_name))
    return "/".join(name.split("/")[:depth])


def cycle_report(hlo_text: str, depth: int = 5) -> CycleReport:
    """Sum and group the ENTRY computation's estimated cycles (see the module docstring)."""
    total = 0
    num_estimated = 0
    without = collections.Counter()
    by_source = collections.Counter()
    by_opcode = collections.Counter()
    for inst in entry_instructions(hlo_text):
        if inst.estimated_cycles is None:
            without[inst.opcode] += 1
            continue
        total += inst.estimated_cycles
        num_estimated += 1
        by_source[source_key(inst.op_name, depth) if inst.op_name else f"<{inst.opcode}>"] += inst.estimated_cycles
        by_opcode[inst.opcode] += inst.estimated_cycles
    return CycleReport(total_cycles=total, num_estimated=num_estimated, without_estimate=dict(without),
                       by_source=by_source.most_common(), by_opcode=by_opcode.most_common())


def format_report(report: CycleReport, top: int = 20, clock_hz: float | None = None) -> str:
    """The report as text: the total (and its time at `clock_hz`), the share of each opcode,
    then the `top` source ops, largest first."""
    total = max(report.total_cycles, 1)
    head = f"{report.num_estimated} instructions with estimated_cycles, total {report.total_cycles:,d} cycles"
    if clock_hz:
        head += f" = {report.seconds(clock_hz) * 1e3:.3f} ms at {clock_hz / 1e9:.3g} GHz"
    lines = [head]
    if report.without_estimate:
        lines.append("without an estimate: " + ", ".join(
            f"{op} x{n}" for op, n in sorted(report.without_estimate.items(), key=lambda kv: -kv[1])))
    lines.append("by opcode: " + ", ".join(f"{op} {c / total:.1%}" for op, c in report.by_opcode[:8]))
    for key, cycles in report.by_source[:top]:
        lines.append(f"{cycles / total:7.2%}  {cycles:>14,d}  {key}")
    return "\n".join(lines)
