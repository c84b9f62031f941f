"""The attention layout grammar of VIMPAC (the released `vimpac/modeling.py`).

A layout string lists the attention blocks of one layer:
  - `,` separates blocks applied one after another (each with its own residual);
  - `|` splits one block into attentions run in parallel whose outputs are concatenated;
  - `x` joins axes into one attention over their product (the paper's `TxHxW`, `HxW`).
`T,H|W` (the default) is temporal attention, then height and width attention in parallel.
"""

AXES = ("T", "H", "W")

# Lines are attended in windows of about this many tokens: several short lines side by side in
# one [window, window] score matrix, masked to the pairs of the same line. A TPU lays an array's
# last two dimensions out in tiles of 8 x 128 and its matrix units are 128 x 128 (v4, v5p;
# https://cloud.google.com/tpu/docs/system-architecture-tpu-vm): scores of one line of 6 or 17
# tokens fill 3-12% of a tile, so their elementwise work and layout copies cost 8-40x their
# size. A window of 80-128 tokens fills most of a tile for a few times the (small) FLOPs of
# QK^T and PV (benchmarks/RESULTS.md, "The pre-training step on a TPU by XLA's cost model").
WINDOW_TOKENS = 128


def parse_layout(layout: str) -> tuple[tuple[tuple[str, ...], ...], ...]:
    """`'T,H|W'` -> `((('T',),), (('H',), ('W',)))`: blocks -> parallel attentions -> axes.

    Axes inside one attention are returned in T, H, W order, so `WxH` equals `HxW`.
    """
    if not isinstance(layout, str) or not layout.strip():
        raise ValueError(f"layout must be a non-empty string such as 'T,H|W', got {layout!r}")
    blocks = []
    for block in layout.replace(" ", "").split(","):
        if not block:
            raise ValueError(f"layout {layout!r} has an empty block (two commas or a trailing comma)")
        attentions = []
        for attention in block.split("|"):
            axes = attention.split("x")
            bad = [a for a in axes if a not in AXES]
            if bad or not attention:
                raise ValueError(f"layout {layout!r}: {attention!r} is not an axis product of T, H, W "
                                 f"(use 'T', 'HxW', 'TxHxW', ...)")
            if len(set(axes)) != len(axes):
                raise ValueError(f"layout {layout!r}: axis repeated in {attention!r}")
            attentions.append(tuple(a for a in AXES if a in axes))
        blocks.append(tuple(attentions))
    return tuple(blocks)
