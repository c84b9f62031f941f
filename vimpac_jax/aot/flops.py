"""The FLOPs a training step of VIMPAC requires, counted from the model's shapes: the numerator of
"fraction of the chip's peak" in `benchmarks/pretrain_step.py` (measured step times) and
`vimpac compile` (the cost model's estimate), so both mean the same thing.

Only the matmuls the model needs are counted (FLOPS_FORMULA); recomputation (remat), padding of
the masked positions to a static bound, softmax, LayerNorm and element-wise work are not, so a
program that does extra work shows a lower fraction, not a higher one.
"""

import math

from vimpac_jax.models.layout import parse_layout
from vimpac_jax.training.masking import expected_mask_ratio

FLOPS_FORMULA = """\
required FLOPs per clip = 3 x forward (backward = 2 x forward); forward, N = T*H*W tokens (+1 CLS),
d model width, a = attention width (d, or d/2 with halve_att), m = MLP width (4d, or 2d with
halve_mlp), V = 8197, K = expected masked positions = ratio(T,H,W,blocks) * N:
  per layer, per attention block with p parallel attentions over lines of length l_i = 1 + |axes_i|
  (N/|axes_i| lines each):  q,k,v: 3*2*(N+1)*d*a   out: 2*(N+1)*a*d   QK^T and PV: sum_i 4*(N/|axes_i|)*l_i^2*(a/p)
  per layer, MLP: 2*2*(N+1)*d*m
  MLM head at K positions: 2*K*d*d + 2*K*d*V
  projection head on CLS: 2*(d*h + (n-2)*h*h + h*256) for n >= 2 layers of width h"""


def forward_flops_per_clip(cfg, mask_ratio: float) -> dict:
    """Forward matmul FLOPs of one clip, by part (see FLOPS_FORMULA); `cfg` a complete model block
    (`models.config.model_config`, or a stored one through its loader)."""
    t, h, w, d = cfg["clip_len"], cfg["height"], cfg["width"], cfg["hidden_dim"]
    n = t * h * w
    a = d // 2 if cfg["halve_att"] else d
    m = 2 * d if cfg["halve_mlp"] else 4 * d
    sizes = {"T": t, "H": h, "W": w}
    layer = 0.0
    for block in parse_layout(cfg["layout"]):
        layer += 3 * 2 * (n + 1) * d * a + 2 * (n + 1) * a * d
        for axes in block:
            line = math.prod(sizes[x] for x in axes)
            layer += 4 * (n // line) * (1 + line) ** 2 * (a / len(block))
    layer += 2 * 2 * (n + 1) * d * m
    k = mask_ratio * n
    mlm = 2 * k * d * d + 2 * k * d * cfg["vocab_size"]
    hid, layers = cfg["proj_hidden_dim"], cfg["proj_layers"]
    out = cfg["proj_dim"]
    proj = 2 * (d * hid + (layers - 2) * hid * hid + hid * out) if layers >= 2 else 2 * d * out
    return {"layers": cfg["num_layers"] * layer, "mlm_head": mlm, "proj_head": proj}



def required_flops_per_clip(task: str, model_cfg, pretrain_cfg=None) -> tuple[dict, float]:
    """(forward FLOPs of one clip by part, the expected masking ratio) for a training step of
    `task`; the step requires 3 x their sum per clip (forward + backward).

    pretrain: the layers, the MLM head at the expected masked positions of block masking with
    `pretrain_cfg['mask_blocks']`, the projection head. finetune: the layers and the classifier
    (`model_cfg['num_classes']` outputs), nothing masked."""
    if task == "finetune":
        parts = forward_flops_per_clip(model_cfg, 0.0)
        return {"layers": parts["layers"], "classifier": 2 * model_cfg["hidden_dim"] * model_cfg["num_classes"]}, 0.0
    ratio = expected_mask_ratio((model_cfg["clip_len"], model_cfg["height"], model_cfg["width"]),
                                pretrain_cfg["mask_blocks"])
    return forward_flops_per_clip(model_cfg, ratio), ratio
