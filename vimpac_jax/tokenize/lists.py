"""The video list of a tokenize job: list files or directories -> unique items, and their hash."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence

from vimpac_jax.data import annotations

log = logging.getLogger(__name__)


def read_items(videos: str, video_root: str | None = None, class_names: Sequence[str] | None = None,
               class_names_source: str = "--class-names") -> tuple[list[annotations.VideoItem], list[str] | None]:
    """The list (mmaction2 `path [label]` lines, or a .csv of ids) or directory -> unique items,
    and the class names: ``class_names`` when given (`vimpac tokenize --class-names`; every label
    must index it), else what the list says (a directory's class folders).

    Repeats of a video id are dropped (a repeat with another label is an error).
    """
    if os.path.isdir(videos):
        ann = annotations.read_video_list(videos, video_root=video_root)
    elif not os.path.isfile(videos):
        raise FileNotFoundError(f"--videos {videos}: no such file or directory")
    elif videos.lower().endswith(".csv"):
        ann = annotations.read_video_list(videos, video_root=video_root)
    else:
        ann = annotations.read_mmaction_list(videos, video_root=video_root)
    items = annotations.unique_by_video_id(ann.items)
    if len(items) < len(ann.items):
        log.info(f"tokenize: {videos}: dropped {len(ann.items) - len(items)} repeated video id(s)")
    if class_names is None:
        return items, ann.class_names
    try:
        annotations.check_labels(items, class_names, videos)
    except ValueError as e:
        raise ValueError(f"{e}: {class_names_source} names {len(class_names)} classes") from None
    return items, list(class_names)


def items_sha256(items: Sequence[annotations.VideoItem]) -> str:
    """A hash of the (video id, label) set: the same videos, in any order and at any root, hash alike."""
    lines = sorted(f"{it.video_id}\t{it.label}\n" for it in items)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def check_video_root(items: Sequence[annotations.VideoItem], video_root: str | None, probe: int = 20) -> None:
    """Fail before any work when none of the first videos exists: a wrong --video-root, most likely.

    (Single missing files are listed in errors.txt instead.)
    """
    head = items[:probe]
    if head and not any(os.path.exists(it.path) for it in head):
        raise FileNotFoundError(
            f"none of the first {len(head)} videos exists (e.g. {head[0].path!r}); "
            f"check --video-root (now {video_root!r}; relative paths are read from the current directory)")
