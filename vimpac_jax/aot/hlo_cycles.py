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
- The ENTRY computation's instructions, and the instructions of the computations it runs: a
  `while` (a `jax.lax.scan`: gradient accumulation over micro-batches, `model.scan_layers`) has
  no estimate of its own, so its body and condition are counted once per trip, the trip count
  read from the while's `known_trip_count` or else from its condition (`i < N` against a
  constant, the loop counter starting at 0 as jax's scans do); a `call` counts its computation
  once. A loop whose trip count cannot be read is counted in `CycleReport.unknown_loops` and
  left out (the total is then a lower bound). A fusion's estimate covers its fused computation,
  which is not descended into (it would be counted twice).
- Instructions with no estimate (parameters, tuples, custom-calls such as the `rbg` RNG's
  `X64Combine`, custom fusions) are counted by opcode in `CycleReport.without_estimate`, not
  guessed.
- A Pallas TPU kernel (a custom-call to `tpu_custom_call`, compiled by Mosaic) has no estimate
  either; given the chip (`cycle_report(..., chip=)`), each is charged at twice its roofline time
  (issue 23: max(its FLOPs at the chip's bf16 peak, its bytes at the HBM bandwidth) x 2, i.e. 50%
  efficiency, at the chip's clock), its FLOPs and bytes read from the `cost_estimate` that Pallas
  serialises into the custom-call's backend config (`pl.CostEstimate`), or, for a kernel without
  one, its bytes from its operand and result shapes and no FLOPs. The charge is a guess, not a
  measurement: it is added to the total and reported on its own line (`CycleReport.pallas_cycles`).
- The text format is XLA's HLO printer's (`name = shape opcode(operands), attr=...`), with or
  without the `%` before names; nothing else of the module is interpreted.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

_ASSIGN = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[^\s=]+)\s*=\s*(?P<rest>.*)$")
_OPCODE = re.compile(r"\s*(?P<opcode>[A-Za-z][\w\-]*)\(")
_CYCLES = re.compile(r'"estimated_cycles"\s*:\s*"?(?P<cycles>\d+)"?')
_OP_NAME = re.compile(r'op_name="(?P<op_name>(?:[^"\\]|\\.)*)"')
_LAYER_INDEX = re.compile(r"\b(layer|block|layers)_\d+\b")
_JIT_PREFIX = re.compile(r"^(?:jit\([^)]*\)/)+")
_LOOP_PARTS = re.compile(r"(?:^|(?<=/))(?:while/body|while/cond|closed_call)/")  # a scan's wrappers
_FUSION_KIND = re.compile(r"\bkind=(?P<kind>k\w+)")
_COMPUTATION = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[^\s(=]+)\s*\(.*\{\s*$")
_CALLED = re.compile(r"\b(?P<role>condition|body|to_apply)=%?(?P<name>[^\s,)}]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(?P<n>\d+)"?')
_CONSTANT = re.compile(r"\bconstant\((?P<value>-?\d+)\)")
_OPERANDS = re.compile(r"compare\(%?(?P<a>[^\s,)]+),\s*%?(?P<b>[^\s,)]+)\)")
_PALLAS_TARGET = 'custom_call_target="tpu_custom_call"'
_COST_ESTIMATE = re.compile(r'"cost_estimate"\s*:\s*\{(?P<fields>[^}]*)\}')
_COST_FIELD = r'"{}"\s*:\s*"?(?P<n>\d+)"?'
_OPERAND_SHAPES = re.compile(r"\boperand_layout_constraints=\{(?P<shapes>.*?)\}\s*(?:,|$)")
_ARRAY_SHAPE = re.compile(r"\b(?P<dtype>pred|[bsuf]\d+|bf16|c64|c128)\[(?P<dims>[\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One instruction of a computation."""

    name: str
    opcode: str  # a fusion's with its kind: "fusion:kLoop", "fusion:kOutput", ...
    op_name: str  # the JAX source op (metadata op_name), "" when the instruction has none
    estimated_cycles: int | None  # None when the cost model gave no estimate
    called: tuple[tuple[str, str], ...] = ()  # (role, computation): while's condition/body, call's to_apply
    trip_count: int | None = None  # a while's known_trip_count, when XLA printed one
    constant: int | None = None  # an integer scalar constant's value
    compared: tuple[str, str] | None = None  # a compare's operands
    direction: str = ""  # a compare's direction
    root: bool = False
    kernel: KernelCost | None = None  # a Pallas TPU kernel's FLOPs and bytes


@dataclasses.dataclass(frozen=True)
class KernelCost:
    """What a Pallas kernel (a `tpu_custom_call`) does, for its roofline charge."""

    flops: int
    bytes_accessed: int
    source: str  # "cost_estimate" (the kernel's pl.CostEstimate) or "shapes" (operand + result bytes, no FLOPs)

    def charged_cycles(self, chip) -> int:
        """Twice the roofline time (50% efficiency) of the kernel on `chip` (a chips.Generation),
        in cycles of its clock."""
        seconds = max(self.flops / (chip.bf16_tflops * 1e12), self.bytes_accessed / (chip.hbm_gbytes_per_s * 1e9))
        return int(round(2 * seconds * chip.clock_hz))


def _shapes_bytes(text: str) -> int:
    return sum(_DTYPE_BYTES.get(m["dtype"], 0) * math.prod(int(d) for d in m["dims"].split(",") if d)
               for m in _ARRAY_SHAPE.finditer(text))


def _kernel_cost(line: str, result_shape: str) -> KernelCost:
    found = _COST_ESTIMATE.search(line)
    if found:
        fields = {k: re.search(_COST_FIELD.format(k), found["fields"]) for k in ("flops", "bytes_accessed")}
        if all(fields.values()):
            return KernelCost(int(fields["flops"]["n"]), int(fields["bytes_accessed"]["n"]), "cost_estimate")
    operands = _OPERAND_SHAPES.search(line)
    return KernelCost(0, _shapes_bytes(result_shape) + (_shapes_bytes(operands["shapes"]) if operands else 0), "shapes")


@dataclasses.dataclass(frozen=True)
class CycleReport:
    """Estimated cycles of one run of the ENTRY computation (loops counted per trip), summed and
    grouped (groups: largest first)."""

    total_cycles: int
    num_estimated: int  # instructions with an estimate (each counted once, whatever its trips)
    without_estimate: dict[str, int]  # opcode -> count of instructions without one
    by_source: list[tuple[str, int]]  # (source op, layer indices folded, cut to `depth` parts), cycles
    by_opcode: list[tuple[str, int]]  # (opcode, a fusion's with its kind), cycles
    loops: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (while instruction, trips)
    unknown_loops: int = 0  # whiles whose trip count could not be read: left out of the total
    pallas_kernels: int = 0  # Pallas kernels charged (each counted once, whatever its trips)
    pallas_cycles: int = 0  # their charge, per trip, included in total_cycles
    pallas_sources: tuple[str, ...] = ()  # where their FLOPs and bytes came from (KernelCost.source)

    @property
    def estimated_cycles(self) -> int:
        """The cost model's own cycles: the total without the Pallas kernels' charge."""
        return self.total_cycles - self.pallas_cycles

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


def _instruction(line: str) -> Instruction | None:
    assign = _ASSIGN.match(line)
    if not assign:
        return None
    rest = assign["rest"]
    after_shape = rest[_shape_end(rest):]
    opcode = _OPCODE.match(after_shape)
    if not opcode:
        return None
    op = opcode["opcode"]
    kind = _FUSION_KIND.search(rest) if op == "fusion" else None
    cycles, op_name = _CYCLES.search(line), _OP_NAME.search(line)
    trip = _TRIP_COUNT.search(line) if op == "while" else None
    constant = _CONSTANT.match(after_shape.strip()) if op == "constant" else None
    compared = _OPERANDS.search(after_shape) if op == "compare" else None
    direction = re.search(r"\bdirection=(\w+)", rest) if op == "compare" else None
    kernel = _kernel_cost(line, rest[:_shape_end(rest)]) if op == "custom-call" and _PALLAS_TARGET in rest else None
    return Instruction(
        name=assign["name"], opcode=f"fusion:{kind['kind']}" if kind else op,
        op_name=op_name["op_name"] if op_name else "",
        estimated_cycles=int(cycles["cycles"]) if cycles else None,
        called=tuple((m["role"], m["name"]) for m in _CALLED.finditer(rest)) if op in ("while", "call") else (),
        trip_count=int(trip["n"]) if trip else None,
        constant=int(constant["value"]) if constant else None,
        compared=(compared["a"], compared["b"]) if compared else None,
        direction=direction.group(1) if direction else "",
        root=line.lstrip().startswith("ROOT "), kernel=kernel)


def computations(hlo_text: str) -> tuple[str, dict[str, list[Instruction]]]:
    """(the ENTRY computation's name, {computation name: its instructions in order}).

    Raises ValueError when the text has no ENTRY computation (not an HLO module's text)."""
    entry, comps, current = None, {}, None
    for line in hlo_text.splitlines():
        if current is None:
            header = _COMPUTATION.match(line)
            if header:
                current = header["name"]
                comps[current] = []
                if header["entry"]:
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        inst = _instruction(line)
        if inst is not None:
            comps[current].append(inst)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text (expected a compiled module's as_text())")
    return entry, comps


def entry_instructions(hlo_text: str) -> list[Instruction]:
    """The instructions of the module's ENTRY computation, in order (ValueError: no ENTRY)."""
    entry, comps = computations(hlo_text)
    return comps[entry]


def trip_count(loop: Instruction, comps: dict[str, list[Instruction]]) -> int | None:
    """Trips of a while: its known_trip_count, else N of a condition `i < N` (N a constant of the
    condition; the counter starting at 0, as jax's scans), else None."""
    if loop.trip_count is not None:
        return loop.trip_count
    condition = comps.get(dict(loop.called).get("condition", ""), [])
    constants = {i.name: i.constant for i in condition if i.constant is not None}
    root = next((i for i in condition if i.root), None)
    if root is not None and root.compared and root.direction == "LT" and root.compared[1] in constants:
        return constants[root.compared[1]]
    return None


def source_key(op_name: str, depth: int = 5) -> str:
    """The group of a source op: the `jit(...)/` prefix and a scan's `while/body/closed_call/`
    dropped, layer indices folded (`layer_3` -> `layer_*`), cut to its first `depth` path parts."""
    name = _LAYER_INDEX.sub(lambda m: m.group(1) + "_*", _JIT_PREFIX.sub("", op_name))
    name = _LOOP_PARTS.sub("", name)
    return "/".join(name.split("/")[:depth])


def cycle_report(hlo_text: str, depth: int = 5, chip=None) -> CycleReport:
    """Sum and group the estimated cycles of one run of the ENTRY computation, loops counted per
    trip (see the module docstring); with `chip` (a chips.Generation), the Pallas kernels charged
    at twice their roofline time and added (their source groups marked "[Pallas, charged]")."""
    entry, comps = computations(hlo_text)
    totals = {"cycles": 0, "estimated": 0, "unknown_loops": 0, "kernels": 0, "kernel_cycles": 0}
    kernel_sources = set()
    without = collections.Counter()
    by_source = collections.Counter()
    by_opcode = collections.Counter()
    loops = []

    def visit(name: str, times: int, seen: tuple) -> None:
        if name in seen or name not in comps:  # recursion cannot happen in HLO; guard anyway
            return
        for inst in comps[name]:
            if inst.opcode == "while":
                trips = trip_count(inst, comps)
                if trips is None:
                    totals["unknown_loops"] += 1
                    continue
                loops.append((inst.name, trips))
                for _, callee in inst.called:
                    visit(callee, times * trips, seen + (name,))
                continue
            if inst.opcode == "call":
                for _, callee in inst.called:
                    visit(callee, times, seen + (name,))
                continue
            key = source_key(inst.op_name, depth) if inst.op_name else f"<{inst.opcode}>"
            if inst.estimated_cycles is None and inst.kernel is not None and chip is not None:
                cycles = inst.kernel.charged_cycles(chip) * times
                totals["cycles"] += cycles
                totals["kernels"] += 1
                totals["kernel_cycles"] += cycles
                kernel_sources.add(inst.kernel.source)
                by_source[f"{key} [Pallas, charged]"] += cycles
                by_opcode["custom-call:pallas"] += cycles
                continue
            if inst.estimated_cycles is None:
                without[inst.opcode] += 1
                continue
            cycles = inst.estimated_cycles * times
            totals["cycles"] += cycles
            totals["estimated"] += 1
            by_source[key] += cycles
            by_opcode[inst.opcode] += cycles

    visit(entry, 1, ())
    return CycleReport(total_cycles=totals["cycles"], num_estimated=totals["estimated"],
                       without_estimate=dict(without), by_source=by_source.most_common(),
                       by_opcode=by_opcode.most_common(), loops=loops, unknown_loops=totals["unknown_loops"],
                       pallas_kernels=totals["kernels"], pallas_cycles=totals["kernel_cycles"],
                       pallas_sources=tuple(sorted(kernel_sources)))


def pallas_charge_line(report: CycleReport) -> str:
    """The one line that says what of the total is a charge, not the cost model's estimate."""
    return (f"Pallas kernels charged at 2x roofline (not timed on a chip): {report.pallas_cycles:,d} cycles "
            f"({report.pallas_kernels} kernels; FLOPs and bytes from {' and '.join(report.pallas_sources)})")


def format_report(report: CycleReport, top: int = 20, clock_hz: float | None = None) -> str:
    """The report as text: the total (and its time at `clock_hz`), the share of each opcode,
    then the `top` source ops, largest first."""
    total = max(report.total_cycles, 1)
    head = f"{report.num_estimated} instructions with estimated_cycles, total {report.total_cycles:,d} cycles"
    if report.pallas_kernels:
        head += f" ({report.estimated_cycles:,d} estimated + {report.pallas_cycles:,d} charged)"
    if clock_hz:
        head += f" = {report.seconds(clock_hz) * 1e3:.3f} ms at {clock_hz / 1e9:.3g} GHz"
    lines = [head]
    if report.pallas_kernels:
        lines.append(pallas_charge_line(report))
    if report.loops or report.unknown_loops:
        lines.append("loops: " + ", ".join(f"{name} x{trips}" for name, trips in report.loops)
                     + (f"; {report.unknown_loops} of unknown trip count left out (a lower bound)"
                        if report.unknown_loops else ""))
    if report.without_estimate:
        lines.append("without an estimate: " + ", ".join(
            f"{op} x{n}" for op, n in sorted(report.without_estimate.items(), key=lambda kv: -kv[1])))
    lines.append("by opcode: " + ", ".join(f"{op} {c / total:.1%}" for op, c in report.by_opcode[:8]))
    for key, cycles in report.by_source[:top]:
        lines.append(f"{cycles / total:7.2%}  {cycles:>14,d}  {key}")
    return "\n".join(lines)
