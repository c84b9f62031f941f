"""Pictures: PNG files and TensorBoard images, the confusion matrix of a test, a sweep's plot.

Pillow writes and reads the PNGs and draws the labels of Fig. 5 (`vimpac_jax/visualize.py`);
matplotlib draws the confusion matrix (`vimpac evaluate`) and the sweep plot (`vimpac sweep`),
through its Agg canvas (no pyplot, no display). Both come with the `viz` extra:

    pip install 'vimpac-jax[viz]'

Images are uint8 [H, W, 3] numpy arrays throughout; `write_tensorboard_images` adds them to a
TensorBoard log directory (tensorboardX, no TensorFlow).
"""

from __future__ import annotations

import importlib
import io
import math
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vimpac_jax import io_utils

VIZ_EXTRA = "pip install 'vimpac-jax[viz]'"


class VizExtraMissing(ImportError):
    """Pillow or matplotlib is not installed (the `viz` extra)."""


def require(module: str, what: str):
    """import `module` (PIL.Image, matplotlib, ...) or raise `VizExtraMissing` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = {"PIL": "Pillow"}.get(module.split(".")[0], module.split(".")[0])
        raise VizExtraMissing(f"{what} needs {package}, which is not installed: install the viz extra, "
                              f"{VIZ_EXTRA}") from e


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    return image


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> the bytes of an RGB PNG."""
    pil = require("PIL.Image", "writing a PNG")
    buf = io.BytesIO()
    pil.fromarray(_check_image(image), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def write_png(path, image: np.ndarray) -> Path:
    """`image` (uint8 [H, W, 3]) to the PNG file `path`, atomically (no half image is ever left)."""
    path = Path(path)
    data = encode_png(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    io_utils.write_bytes_atomic(path, data)
    return path


def decode_png(data: bytes) -> np.ndarray:
    """The bytes of a PNG -> uint8 [H, W, 3]."""
    pil = require("PIL.Image", "reading a PNG")
    with pil.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def read_png(path) -> np.ndarray:
    """A PNG file -> uint8 [H, W, 3]."""
    return decode_png(Path(path).read_bytes())


def write_tensorboard_images(logdir, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Adds {tag: uint8 [H, W, 3]} at `step` to the TensorBoard log directory `logdir` (a new
    event file beside the run's others), written and closed before this returns."""
    require("PIL.Image", "a TensorBoard image")  # tensorboardX encodes the PNG with Pillow
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2
    from tensorboardX.summary import image as image_summary

    Path(logdir).mkdir(parents=True, exist_ok=True)
    writer = EventsWriter(str(Path(logdir) / "events"), filename_suffix=".images")
    try:
        for tag, image in images.items():
            summary = image_summary(tag, _check_image(image), dataformats="HWC")
            writer.write_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
        writer.flush()
    finally:
        writer.close()


# ----------------------------------------------------------------------------------------------
# matplotlib figures.


def _figure(width_in: float, height_in: float):
    require("matplotlib", "this plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _to_image(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])


def confusion_matrix(labels: Sequence[int], predictions: Sequence[int], num_classes: int) -> np.ndarray:
    """int64 [C, C]: row = true class, column = predicted class, entries = videos."""
    labels, predictions = np.asarray(labels, np.int64), np.asarray(predictions, np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must be in [0, {num_classes}), found {values.min()}..{values.max()}")
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def confusion_matrix_image(matrix: np.ndarray, class_names: Optional[Sequence[str]] = None,
                           title: str = "") -> np.ndarray:
    """The confusion matrix as a picture, each row normalised to the fraction of its true class
    (the diagonal is the per-class accuracy); class names on the axes up to 60 classes, counts
    in the cells up to 20."""
    matrix = np.asarray(matrix)
    c = matrix.shape[0]
    rows = matrix.sum(axis=1, keepdims=True)
    fraction = np.divide(matrix, rows, out=np.zeros(matrix.shape, np.float64), where=rows > 0)
    size = float(np.clip(2.5 + 0.18 * c, 4.5, 24.0))
    fig = _figure(size + 1.2, size)
    ax = fig.add_subplot(1, 1, 1)
    shown = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    if c <= 60:
        names = list(class_names) if class_names is not None and len(class_names) == c else [str(i) for i in range(c)]
        ax.set_xticks(range(c), names, rotation=90, fontsize=max(4, 9 - c // 10))
        ax.set_yticks(range(c), names, fontsize=max(4, 9 - c // 10))
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=8,
                            color="white" if fraction[i, j] > 0.5 else "black")
    fig.tight_layout()
    return _to_image(fig)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def sweep_plot_image(points: Sequence[tuple[Any, Mapping[str, float]]], field: str,
                     metrics: Sequence[str], title: str = "") -> np.ndarray:
    """One panel per metric: the metric's final value against the swept value of each run.

    points: (swept value, {metric: value}) per run; numbers are drawn on a numeric axis (a log
    axis when they span more than a factor 100 and are all positive), anything else as
    categories in the order given.
    """
    if not metrics:
        raise ValueError("no metrics to plot")
    xs = [x for x, _ in points]
    numeric = all(_number(x) is not None for x in xs)
    cols = min(3, len(metrics))
    nrows = -(-len(metrics) // cols)
    fig = _figure(4.2 * cols, 3.2 * nrows)
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(nrows, cols, k + 1)
        pairs = [(x, m[metric]) for x, m in points if _number(m.get(metric)) is not None]
        if numeric:
            pairs.sort(key=lambda p: float(p[0]))
            px = [float(x) for x, _ in pairs]
            positive = [x for x in px if x > 0]
            if len(positive) == len(px) and px and max(px) / min(px) > 100:
                ax.set_xscale("log")
        else:
            categories = list(dict.fromkeys(str(x) for x in xs))
            px = [categories.index(str(x)) for x, _ in pairs]
            ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right", fontsize=8)
        ax.plot(px, [float(y) for _, y in pairs], marker="o", linestyle="-" if numeric else "none")
        ax.set_xlabel(field)
        ax.set_title(metric, fontsize=10)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _to_image(fig)
