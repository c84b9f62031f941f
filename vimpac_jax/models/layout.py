"""The attention layout grammar of VIMPAC (the released `vimpac/modeling.py`).

A layout string lists the attention blocks of one layer:
  - `,` separates blocks applied one after another (each with its own residual);
  - `|` splits one block into attentions run in parallel whose outputs are concatenated;
  - `x` joins axes into one attention over their product (the paper's `TxHxW`, `HxW`).
`T,H|W` (the default) is temporal attention, then height and width attention in parallel.
"""

AXES = ("T", "H", "W")


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
