"""TPU generations and slice names: the one table `vimpac compile` reads.

A slice is named as Cloud TPU names it, `<generation>-<N>` (`v5p-8`, `v5e-64`, `v4-32`,
`v6e-256`), or by a topology string of libtpu's grammar, `<prefix>:<AxB[xC]>` (`v5p:2x2x1`,
`v5e:8x8`); `parse_slice` turns either into a `Slice`: the generation, the topology string that
`jax.experimental.topologies.get_topology_desc` takes, the number of chips and hosts.

The N of a product name counts TensorCores for v4 and v5p (two per chip, used as one
"megacore" device: v5p-8 is 4 chips, 2x2x1) and chips for v5e and v6e (v5e-64 is 64 chips, 8x8);
https://cloud.google.com/tpu/docs/v5p ("2x2x1: 8 cores, 4 chips, 1 host") and
https://cloud.google.com/tpu/docs/v5e. The same mapping is MaxText's
`src/maxtext/utils/accelerator_to_spec_map.py` (AI-Hypercomputer/maxtext), which also gives
the topology prefix libtpu knows each generation by (`v5:` for v5p) and the hosts' bounds
(2x2x1 chips per host for all four generations).

Per-chip figures (bf16 dense peak, HBM capacity, HBM bandwidth) are Google's system-architecture
pages, read 2026-12-06 (https://cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e).
HBM capacity is the page's; the compiler may keep part of it for itself, so a program within a
few hundred MiB of it is reported as fitting only if the compiler accepted it.
"""

from __future__ import annotations

import dataclasses
import math
import re


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation (per chip)."""

    name: str  # Cloud's name: "v5p"
    topology_prefix: str  # libtpu's topology grammar: "v5" in "v5:2x2x1"
    device_kind: str  # jax's Device.device_kind of its chips
    hbm_gib: float  # HBM per chip
    bf16_tflops: float  # dense bf16 peak per chip
    hbm_gbytes_per_s: float  # HBM bandwidth per chip (GB/s)
    dims: int  # 3: a 3D torus (AxBxC); 2: a 2D one (AxB)
    chips_per_host: int  # chips a host of the slice drives (hosts' bounds 2x2x1)
    cores_per_chip: int  # the TensorCores the product name counts per chip (1 or 2)
    chip_config: str  # get_topology_desc's chip_config_name: "megacore" joins a chip's two cores
    mxu_flops_per_cycle: int  # bf16 FLOPs per cycle of the chip's MXUs: MXUs x (size x size MACs) x 2

    @property
    def clock_hz(self) -> float:
        """The clock the bf16 peak implies: peak / the MXUs' FLOPs per cycle (v4: 1.05 GHz, the
        figure of Jouppi et al., ISCA 2023, "TPU v4", Table 1). Converts the cost model's
        estimated cycles to seconds (`aot/compile.py`)."""
        return self.bf16_tflops * 1e12 / self.mxu_flops_per_cycle


# Sources: the module docstring. MXUs per chip (the same pages, "System architecture"): v4 and
# v5p two TensorCores of four 128x128 MXUs, v5e one TensorCore of four 128x128 MXUs, v6e one
# TensorCore of 256x256 MXUs, four by the page as read in 2025 (a later version says 2, which with
# 918 TFLOP/s would mean a 3.5 GHz clock; 4 gives 1.75 GHz, v5p's). device_kind: what libtpu's topology description reports
# (observed with libtpu 0.0.42.1: "TPU v4", "TPU v5 lite", "TPU v5", "TPU v6 lite").
GENERATIONS = {
    g.name: g for g in (
        Generation("v4", "v4", "TPU v4", hbm_gib=32, bf16_tflops=275, hbm_gbytes_per_s=1200, dims=3,
                   chips_per_host=4, cores_per_chip=2, chip_config="megacore", mxu_flops_per_cycle=2 * 4 * 128 * 128 * 2),
        Generation("v5e", "v5e", "TPU v5 lite", hbm_gib=16, bf16_tflops=197, hbm_gbytes_per_s=819, dims=2,
                   chips_per_host=4, cores_per_chip=1, chip_config="default", mxu_flops_per_cycle=4 * 128 * 128 * 2),
        Generation("v5p", "v5", "TPU v5", hbm_gib=95, bf16_tflops=459, hbm_gbytes_per_s=2765, dims=3,
                   chips_per_host=4, cores_per_chip=2, chip_config="megacore", mxu_flops_per_cycle=2 * 4 * 128 * 128 * 2),
        Generation("v6e", "v6e", "TPU v6 lite", hbm_gib=32, bf16_tflops=918, hbm_gbytes_per_s=1640, dims=2,
                   chips_per_host=4, cores_per_chip=1, chip_config="default", mxu_flops_per_cycle=4 * 256 * 256 * 2),
    )
}
_BY_PREFIX = {g.topology_prefix: g for g in GENERATIONS.values()} | {"v5p": GENERATIONS["v5p"]}


def generation_of_device_kind(device_kind: str) -> Generation | None:
    """The generation whose chips jax reports as `device_kind` (exactly: "TPU v5" is v5p, "TPU v5
    lite" v5e), or None."""
    return next((g for g in GENERATIONS.values() if g.device_kind == device_kind), None)


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: its generation, libtpu's topology string and its size."""

    name: str  # as given: "v5p-8" or "v5p:2x2x1"
    generation: Generation
    topology: str  # for get_topology_desc: "v5:2x2x1"
    shape: tuple[int, ...]  # chips along each torus dimension

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        """Chips per host along each dimension (get_topology_desc's chips_per_host_bounds): 2x2x1,
        or the whole slice when it is smaller than a host."""
        full = tuple(self.shape) + (1,) * (3 - len(self.shape))
        return tuple(min(b, s) for b, s in zip((2, 2, 1), full))

    @property
    def hosts(self) -> int:
        return self.chips // math.prod(self.host_bounds)


def _shape_for_chips(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape Cloud gives `chips` chips (its tables, module docstring): from one host
    (2x2x1; 2x2) the smallest dimension doubles, the last of equals first (v5p: 8 -> 2x2x2,
    16 -> 2x2x4, 32 -> 2x4x4, 64 -> 4x4x4; v5e: 8 -> 2x4, 64 -> 8x8, 256 -> 16x16). Fewer chips
    than a host: 1x1(x1), 1x2(x1)."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chips} chips: Cloud TPU slices have a power-of-two chip count")
    if chips < 4:
        return (1, chips, 1)[:dims] if dims == 3 else (1, chips)
    shape = [2, 2, 1][:dims]
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape)


_PRODUCT = re.compile(r"^(?P<gen>v\d+[a-z]*)-(?P<n>\d+)$")
_TOPOLOGY = re.compile(r"^(?P<prefix>v\d+[a-z]*):(?P<shape>\d+(?:x\d+)+)$")


def parse_slice(name: str) -> Slice:
    """A Cloud TPU product name (`v5p-8`) or topology string (`v5p:2x2x1`, `v5:2x2x1`) -> Slice.

    ValueError naming the accepted forms and generations otherwise."""
    text = name.strip().lower()
    known = ", ".join(sorted(GENERATIONS))
    product, topology = _PRODUCT.match(text), _TOPOLOGY.match(text)
    if product:
        gen = GENERATIONS.get(product["gen"])
        if gen is None:
            raise ValueError(f"--topology {name}: unknown TPU generation {product['gen']!r} (known: {known})")
        cores = int(product["n"])
        if cores % gen.cores_per_chip:
            raise ValueError(f"--topology {name}: {gen.name}-N counts TensorCores, {gen.cores_per_chip} per chip")
        try:
            shape = _shape_for_chips(cores // gen.cores_per_chip, gen.dims)
        except ValueError as e:
            raise ValueError(f"--topology {name}: {e}") from None
    elif topology:
        gen = _BY_PREFIX.get(topology["prefix"])
        if gen is None:
            raise ValueError(f"--topology {name}: unknown TPU generation {topology['prefix']!r} (known: {known})")
        shape = tuple(int(s) for s in topology["shape"].split("x"))
        if len(shape) != gen.dims or min(shape) < 1:
            raise ValueError(f"--topology {name}: a {gen.name} slice has {gen.dims} dimensions "
                             f"({'AxBxC' if gen.dims == 3 else 'AxB'})")
    else:
        raise ValueError(f"--topology {name}: expected a Cloud TPU name such as v5p-8, v5e-64, v4-32, v6e-256, "
                         f"or a topology such as v5p:2x2x1, v5e:2x4 (generations: {known})")
    return Slice(name=name, generation=gen, topology=f"{gen.topology_prefix}:{'x'.join(map(str, shape))}",
                 shape=shape)
