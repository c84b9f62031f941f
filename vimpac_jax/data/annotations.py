"""Readers for the annotation files of the VIMPAC datasets.

Every reader returns an :class:`Annotations`: a list of :class:`VideoItem`
(path to the video file, 0-based integer label or ``None``, video id) and,
where the dataset defines them, the class names in label order.

``video_id`` is always the video's path *relative to the video root*, without
its extension, with ``/`` separators (``ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01``,
``78687``, ``-mmq0PT-u8k_00155``). That is the key the released code stores
tokens under (``splitext(path_in_list)[0]``) and the key its UCF101/HMDB51
split selection matches against, so token stores built from these items stay
compatible with the released ones.

Formats (as published by the dataset authors, and as mmaction2's
``tools/data/parse_file_list.py`` reads them, which is what the released code
relied on):

* mmaction2 video list: ``path label`` per line (``path`` alone for unlabelled).
* UCF101: ``classInd.txt`` (``1 ApplyEyeMakeup``), ``trainlist0N.txt``
  (``ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1``, 1-based label),
  ``testlist0N.txt`` (path only; the label is the class folder).
* HMDB51: ``<class>_test_split<N>.txt`` with ``<video>.avi <0|1|2>``
  (1 = train, 2 = test, 0 = unused in that split); classes sorted by name.
* SSV2: ``something-something-v2-{train,validation,test}.json`` (list of
  ``{"id", "label", "template", "placeholders"}``) and
  ``something-something-v2-labels.json`` (template without brackets -> "index").
* Diving48 V2: ``Diving48_V2_{train,test}.json`` (list of
  ``{"vid_name", "label", "start_frame", "end_frame"}``), ``Diving48_vocab.json``
  (list of ``[takeoff, somersault, twist, flight]``).
* Kinetics: CSV ``label,youtube_id,time_start,time_end,split[,is_cc]`` with a
  header; classes sorted alphabetically.
* HowTo100M: a list of video ids / paths, or a directory of videos.

Only the standard library is used.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from typing import Iterable, Iterator, Sequence

from vimpac_jax import io_utils

__all__ = [
    "VideoItem",
    "Annotations",
    "VIDEO_EXTS",
    "KINETICS_FLAT_PATTERN",
    "KINETICS_MMACTION2_PATTERN",
    "read_mmaction_list",
    "read_label_map",
    "read_ucf101",
    "read_hmdb51",
    "read_ssv2",
    "read_diving48",
    "read_kinetics",
    "read_video_list",
    "read_annotations",
    "write_mmaction_list",
    "unique_by_video_id",
    "DATASET_READERS",
]

VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp")

# The official Kinetics downloader (ActivityNet crawler, copied by mmaction2's
# tools/data/kinetics/download.py) names clips '%s_%06d_%06d.mp4'.
KINETICS_FLAT_PATTERN = "{youtube_id}_{time_start:06d}_{time_end:06d}{ext}"
# mmaction2 additionally puts each clip in a class folder whose spaces were
# replaced by '_' (tools/data/kinetics/rename_classnames.sh); its video lists,
# and hence the released token keys, look like 'abseiling/<id>_000001_000011'.
KINETICS_MMACTION2_PATTERN = "{label_dir}/{youtube_id}_{time_start:06d}_{time_end:06d}{ext}"


@dataclasses.dataclass(frozen=True)
class VideoItem:
    """One video: where its file is, its 0-based label (None if unlabelled) and its id."""

    path: str
    label: int | None
    video_id: str


@dataclasses.dataclass
class Annotations:
    """The videos of one split of a dataset and, where known, its class names."""

    items: list[VideoItem]
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[VideoItem]:
        return iter(self.items)

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)


# ----------------------------------------------------------------------------
# small helpers


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")


def _read_lines(path: str, what: str) -> list[str]:
    _require_file(path, what)
    # utf-8-sig: tolerate a BOM; splitlines() also copes with the CRLF endings
    # of the official UCF101 split files.
    with open(path, encoding="utf-8-sig") as f:
        return f.read().splitlines()


def _load_json(path: str, what: str):
    _require_file(path, what)
    with open(path, encoding="utf-8-sig") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({what}): {e}") from None


def _join(root: str | None, rel: str) -> str:
    return rel if root is None else os.path.join(root, rel)


def _video_id(rel_path: str) -> str:
    """The released code's token key: relative path without extension."""
    return os.path.splitext(rel_path)[0].replace(os.sep, "/")


def _item(rel_path: str, label: int | None, video_root: str | None) -> VideoItem:
    return VideoItem(path=_join(video_root, rel_path), label=label, video_id=_video_id(rel_path))


def _is_comment(line: str) -> bool:
    # Only '#' followed by whitespace (or nothing) is a comment: HMDB51 has real
    # video files whose names start with '#', e.g. '#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi'.
    return line == "#" or (line.startswith("#") and line[1:2].isspace())


def _parse_int(text: str, path: str, where: str, field: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}:{where}: {field} must be an integer, got {text!r}") from None


def check_labels(items: Sequence[VideoItem], class_names: Sequence[str] | None, source: str) -> None:
    """Every label indexes ``class_names`` (ValueError naming ``source`` and the video otherwise)."""
    if class_names is None:
        return
    n = len(class_names)
    for it in items:
        if it.label is not None and not 0 <= it.label < n:
            raise ValueError(f"{source}: label {it.label} of {it.video_id!r} is outside [0, {n})")


def _class_names_from_dirs(items: Sequence[VideoItem]) -> list[str] | None:
    """Class names from ``<class>/<video>`` ids, if labels and folders agree 1:1 and cover 0..K-1."""
    by_label: dict[int, str] = {}
    for it in items:
        if it.label is None or "/" not in it.video_id:
            return None
        folder = it.video_id.rsplit("/", 2)[-2]
        if by_label.setdefault(it.label, folder) != folder:
            return None
    if not by_label or sorted(by_label) != list(range(len(by_label))):
        return None
    names = [by_label[i] for i in range(len(by_label))]
    return names if len(set(names)) == len(names) else None


def _subset_name(subset: str) -> str:
    # mmaction2 (and the released code) call the UCF101/HMDB51 test list 'val'.
    if subset not in ("train", "test", "val"):
        raise ValueError(f"subset must be 'train' or 'test' (or 'val', same as 'test'), got {subset!r}")
    return "train" if subset == "train" else "test"


def _check_split(split: int) -> int:
    if split not in (1, 2, 3):
        raise ValueError(f"split must be 1, 2 or 3, got {split!r}")
    return split


# ----------------------------------------------------------------------------
# mmaction2 lists


def read_mmaction_list(
    list_file: str,
    video_root: str | None = None,
    class_names: Sequence[str] | None = None,
) -> Annotations:
    """Read an mmaction2 video list: ``path label`` per line, or ``path`` alone.

    Blank lines and comment lines (``#`` followed by a space) are skipped.
    Paths may not contain whitespace (mmaction2 splits on it). ``video_root`` is
    joined in front of each path; ``class_names`` (e.g. from
    :func:`read_label_map`) is attached and the labels checked against it.
    """
    items = []
    for lineno, raw in enumerate(_read_lines(list_file, "video list"), start=1):
        line = raw.strip()
        if not line or _is_comment(line):
            continue
        fields = line.split()
        if len(fields) > 2:
            raise ValueError(
                f"{list_file}:{lineno}: expected 'path [label]', got {len(fields)} fields in {line!r} "
                "(rawframe lists 'dir num_frames label' and multi-label lines are not video lists; "
                "paths may not contain spaces)"
            )
        label = _parse_int(fields[1], list_file, str(lineno), "label") if len(fields) == 2 else None
        items.append(_item(fields[0], label, video_root))
    names = list(class_names) if class_names is not None else None
    check_labels(items, names, list_file)
    return Annotations(items, names)


def read_label_map(path: str) -> list[str]:
    """Class names, one per line, in label order (mmaction2's ``label_map*.txt``)."""
    return [line.strip() for line in _read_lines(path, "label map") if line.strip()]


# ----------------------------------------------------------------------------
# UCF101


def _read_ucf101_class_index(path: str) -> list[str]:
    """classInd.txt: '1 ApplyEyeMakeup' per line, 1-based and contiguous."""
    names: list[str] = []
    for lineno, raw in enumerate(_read_lines(path, "UCF101 class index"), start=1):
        line = raw.strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path}:{lineno}: expected '<index> <ClassName>', got {line!r}")
        index = _parse_int(fields[0], path, str(lineno), "class index")
        if index != len(names) + 1:
            raise ValueError(f"{path}:{lineno}: class index {index}, expected {len(names) + 1} (1-based, in order)")
        names.append(fields[1])
    if not names:
        raise ValueError(f"{path}: no classes")
    return names


def _read_ucf101_official(annotation_dir: str, split: int, subset: str, video_root: str | None) -> Annotations:
    class_names = _read_ucf101_class_index(os.path.join(annotation_dir, "classInd.txt"))
    index = {name: i for i, name in enumerate(class_names)}
    list_file = os.path.join(annotation_dir, f"{subset}list{split:02d}.txt")
    items = []
    for lineno, raw in enumerate(_read_lines(list_file, f"UCF101 {subset} list"), start=1):
        line = raw.strip()
        if not line:
            continue
        fields = line.split()
        # trainlist lines carry a 1-based label, testlist lines do not.
        if len(fields) > 2 or "/" not in fields[0]:
            raise ValueError(f"{list_file}:{lineno}: expected '<Class>/<video>.avi [label]', got {line!r}")
        # Like mmaction2, take the label from the class folder; it is the only
        # source for testlist and a cross-check of trainlist's own number.
        folder = fields[0].split("/", 1)[0]
        if folder not in index:
            raise ValueError(f"{list_file}:{lineno}: class folder {folder!r} is not in classInd.txt")
        label = index[folder]
        if len(fields) == 2:
            given = _parse_int(fields[1], list_file, str(lineno), "label")
            if given - 1 != label:
                raise ValueError(
                    f"{list_file}:{lineno}: label {given} disagrees with classInd.txt "
                    f"({folder!r} is {label + 1})"
                )
        items.append(_item(fields[0], label, video_root))
    return Annotations(items, class_names)


def _resolve_source(source: str, official_found: bool, official_what: str, mm_list: str,
                    dataset: str, directory: str) -> str:
    """Pick 'official' or 'mmaction2' annotations; 'auto' prefers the official files."""
    if source not in ("auto", "official", "mmaction2"):
        raise ValueError(f"source must be 'auto', 'official' or 'mmaction2', got {source!r}")
    if source != "auto":
        return source
    if official_found:
        return "official"
    if os.path.isfile(mm_list):
        return "mmaction2"
    raise FileNotFoundError(
        f"no {dataset} annotations in {directory}: looked for the official {official_what} "
        f"and the mmaction2 list {os.path.basename(mm_list)}"
    )


def read_ucf101(
    annotation_dir: str,
    split: int = 1,
    subset: str = "train",
    video_root: str | None = None,
    source: str = "auto",
) -> Annotations:
    """UCF101 split ``split`` (1-3), ``subset`` 'train' or 'test' ('val' = 'test').

    ``source='official'`` reads ``classInd.txt`` and ``{train,test}list0N.txt``
    from ``annotation_dir`` (the ``ucfTrainTestlist`` folder); ``'mmaction2'``
    reads ``ucf101_{train,val}_split_N_videos.txt`` from it; ``'auto'`` prefers
    the official files. Labels are 0-based in classInd order.
    """
    split, subset = _check_split(split), _subset_name(subset)
    mm_list = os.path.join(annotation_dir, f"ucf101_{'train' if subset == 'train' else 'val'}_split_{split}_videos.txt")
    class_ind = os.path.join(annotation_dir, "classInd.txt")
    source = _resolve_source(source, os.path.isfile(class_ind), "classInd.txt", mm_list, "UCF101", annotation_dir)
    if source == "official":
        return _read_ucf101_official(annotation_dir, split, subset, video_root)
    ann = read_mmaction_list(mm_list, video_root)
    names = _read_ucf101_class_index(class_ind) if os.path.exists(class_ind) else _class_names_from_dirs(ann.items)
    check_labels(ann.items, names, mm_list)
    return Annotations(ann.items, names)


# ----------------------------------------------------------------------------
# HMDB51

_HMDB_SPLIT_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<split>[123])\.txt$")


def _hmdb51_split_files(split_dir: str, split: int) -> dict[str, str]:
    """{class name: split file} for one split, from '<class>_test_split<N>.txt' names."""
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"HMDB51 split directory not found: {split_dir}")
    found = {}
    for name in os.listdir(split_dir):
        m = _HMDB_SPLIT_FILE.match(name)
        if m and int(m["split"]) == split:
            found[m["cls"]] = os.path.join(split_dir, name)
    return found


def _read_hmdb51_official(split_dir: str, split: int, subset: str, video_root: str | None) -> Annotations:
    files = _hmdb51_split_files(split_dir, split)
    if not files:
        raise FileNotFoundError(f"no HMDB51 files '<class>_test_split{split}.txt' in {split_dir}")
    # mmaction2 numbers classes by sorted folder name (== these file-name stems),
    # e.g. brush_hair=0 ... flic_flac=14 ... wave=50, as in the released lists.
    class_names = sorted(files)
    wanted = "1" if subset == "train" else "2"
    items = []
    for label, cls in enumerate(class_names):
        path = files[cls]
        for lineno, raw in enumerate(_read_lines(path, "HMDB51 split file"), start=1):
            line = raw.strip()  # official lines end with a trailing space
            if not line:
                continue
            fields = line.split()
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise ValueError(f"{path}:{lineno}: expected '<video>.avi <0|1|2>', got {line!r}")
            if fields[1] == wanted:
                items.append(_item(f"{cls}/{fields[0]}", label, video_root))
    return Annotations(items, class_names)


def read_hmdb51(
    split_dir: str,
    split: int = 1,
    subset: str = "train",
    video_root: str | None = None,
    source: str = "auto",
) -> Annotations:
    """HMDB51 split ``split`` (1-3), ``subset`` 'train' or 'test' ('val' = 'test').

    ``source='official'`` reads the 51 ``<class>_test_split<N>.txt`` files in
    ``split_dir`` (the ``testTrainMulti_7030_splits`` folder; marker 1 = train,
    2 = test, 0 = unused); ``'mmaction2'`` reads
    ``hmdb51_{train,val}_split_N_videos.txt`` from it; ``'auto'`` prefers the
    official files. Classes are sorted by name (mmaction2's order); video paths
    are ``<class>/<video>.avi`` under ``video_root``.
    """
    split, subset = _check_split(split), _subset_name(subset)
    mm_list = os.path.join(split_dir, f"hmdb51_{'train' if subset == 'train' else 'val'}_split_{split}_videos.txt")
    official_found = os.path.isdir(split_dir) and bool(_hmdb51_split_files(split_dir, split))
    source = _resolve_source(source, official_found, f"'<class>_test_split{split}.txt' files", mm_list,
                             "HMDB51", split_dir)
    if source == "official":
        return _read_hmdb51_official(split_dir, split, subset, video_root)
    ann = read_mmaction_list(mm_list, video_root)
    names = _class_names_from_dirs(ann.items)
    return Annotations(ann.items, names)


# ----------------------------------------------------------------------------
# Something-Something V2


def _ssv2_template_key(template: str) -> str:
    # The official loader and mmaction2 strip the brackets:
    # "Putting [something] on [something]" -> "Putting something on something".
    return template.replace("[", "").replace("]", "")


def read_ssv2(
    train_or_val_json: str,
    labels_json: str | None,
    video_root: str | None = None,
    ext: str = ".webm",
) -> Annotations:
    """Something-Something V2: videos ``<id><ext>``, label from the template.

    ``labels_json`` maps bracket-free templates to index strings; entries
    without a ``template`` (the test JSON has only ``id``) get label None.
    ``labels_json`` may be None only for such unlabelled files.
    """
    entries = _load_json(train_or_val_json, "SSV2 annotation JSON")
    if not isinstance(entries, list):
        raise ValueError(f"{train_or_val_json}: expected a JSON list of videos, got {type(entries).__name__}")
    class_names = None
    mapping: dict[str, int] = {}
    if labels_json is not None:
        raw = _load_json(labels_json, "SSV2 labels JSON")
        if not isinstance(raw, dict):
            raise ValueError(f"{labels_json}: expected a JSON object template -> index")
        for key, value in raw.items():
            mapping[key] = _parse_int(str(value), labels_json, f"key {key!r}", "class index")
        if sorted(mapping.values()) != list(range(len(mapping))):
            raise ValueError(f"{labels_json}: class indices are not 0..{len(mapping) - 1}")
        class_names = sorted(mapping, key=mapping.__getitem__)
    items = []
    for i, entry in enumerate(entries):
        where = f"entry {i}"
        if not isinstance(entry, dict) or "id" not in entry:
            raise ValueError(f"{train_or_val_json}:{where}: missing field 'id'")
        label = None
        if "template" in entry:
            if labels_json is None:
                raise ValueError(f"{train_or_val_json}:{where}: has a template but no labels_json was given")
            key = _ssv2_template_key(entry["template"])
            if key not in mapping:
                raise ValueError(
                    f"{train_or_val_json}:{where}: template {entry['template']!r} ({key!r}) is not in {labels_json}"
                )
            label = mapping[key]
        items.append(_item(f"{entry['id']}{ext}", label, video_root))
    return Annotations(items, class_names)


# ----------------------------------------------------------------------------
# Diving48


def read_diving48(
    json_file: str,
    vocab_json: str | None = None,
    video_root: str | None = None,
    ext: str = ".mp4",
) -> Annotations:
    """Diving48 (V2 JSON): videos ``<vid_name><ext>``, label = the ``label`` field.

    ``start_frame``/``end_frame`` are not used: the distributed clips are
    already trimmed. Class names come from ``vocab_json`` (each entry
    ``[takeoff, somersault, twist, flight]``, joined with '+', as mmaction2's
    label_map.txt: ``Back+15som+05Twis+FREE``).
    """
    entries = _load_json(json_file, "Diving48 annotation JSON")
    if not isinstance(entries, list):
        raise ValueError(f"{json_file}: expected a JSON list of videos, got {type(entries).__name__}")
    class_names = None
    if vocab_json is not None:
        vocab = _load_json(vocab_json, "Diving48 vocabulary JSON")
        if not isinstance(vocab, list):
            raise ValueError(f"{vocab_json}: expected a JSON list of classes")
        class_names = ["+".join(v) if isinstance(v, list) else str(v) for v in vocab]
    items = []
    for i, entry in enumerate(entries):
        where = f"entry {i}"
        for field in ("vid_name", "label"):
            if not isinstance(entry, dict) or field not in entry:
                raise ValueError(f"{json_file}:{where}: missing field {field!r}")
        label = entry["label"]
        if isinstance(label, bool) or not isinstance(label, int):
            label = _parse_int(str(label), json_file, where, "'label'")
        items.append(_item(f"{entry['vid_name']}{ext}", label, video_root))
    check_labels(items, class_names, json_file)
    return Annotations(items, class_names)


# ----------------------------------------------------------------------------
# Kinetics


def _kinetics_label(text: str) -> str:
    # mmaction2 strips stray double quotes left in some Kinetics CSV releases.
    return text.replace('"', "").strip()


def _kinetics_sort_key(name: str) -> tuple[str, str]:
    # mmaction2 sorts the names with spaces replaced by '_' (its folder names);
    # the name itself breaks ties so the order never depends on set iteration.
    return name.replace(" ", "_"), name


def _read_kinetics_rows(csv_file: str) -> list[tuple[int, dict[str, str]]]:
    _require_file(csv_file, "Kinetics CSV")
    with open(csv_file, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for column in ("youtube_id", "time_start", "time_end"):
            if column not in header:
                raise ValueError(
                    f"{csv_file}: missing column {column!r} in header {header} "
                    "(expected 'label,youtube_id,time_start,time_end,split[,is_cc]')"
                )
        # line 1 is the header, so data row k is on line k + 1.
        return [(reader.line_num, row) for row in reader]


def read_kinetics(
    csv_file: str,
    video_root: str | None = None,
    ext: str = ".mp4",
    filename_pattern: str = KINETICS_FLAT_PATTERN,
    classes_csv: str | None = None,
) -> Annotations:
    """Kinetics(-400/600/700) from its CSV ``label,youtube_id,time_start,time_end,split[,is_cc]``.

    Class names are the CSV's labels sorted alphabetically (spaces compared as
    '_', as mmaction2 does), taken from ``classes_csv`` when given: pass the
    train CSV when reading val/test so every split uses the same numbering.
    ``filename_pattern`` is formatted with ``youtube_id``, ``time_start``,
    ``time_end`` (ints), ``label``, ``label_dir`` (label with spaces -> '_')
    and ``ext``; see :data:`KINETICS_MMACTION2_PATTERN` for mmaction2's layout.
    Rows without a label (test CSV) get label None.
    """
    rows = _read_kinetics_rows(csv_file)
    class_source = classes_csv if classes_csv is not None else csv_file
    class_rows = rows if classes_csv is None else _read_kinetics_rows(classes_csv)
    labels = {_kinetics_label(r.get("label") or "") for _, r in class_rows} - {""}
    class_names = sorted(labels, key=_kinetics_sort_key) or None
    index = {name: i for i, name in enumerate(class_names or [])}
    items = []
    for lineno, row in rows:
        where = f"{csv_file}:{lineno}"
        name = _kinetics_label(row.get("label") or "")
        fields = {"youtube_id": (row.get("youtube_id") or "").strip(), "ext": ext}
        if not fields["youtube_id"]:
            raise ValueError(f"{where}: empty field 'youtube_id'")
        for column in ("time_start", "time_end"):
            try:
                fields[column] = int(float(row.get(column) or ""))
            except ValueError:
                raise ValueError(f"{where}: field {column!r} must be a number, got {row.get(column)!r}") from None
        label = None
        if name:
            if name not in index:
                raise ValueError(f"{where}: label {name!r} is not a class of {class_source}")
            label = index[name]
            fields.update(label=name, label_dir=name.replace(" ", "_"))
        try:
            rel = filename_pattern.format(**fields)
        except KeyError as e:
            raise ValueError(f"{where}: filename_pattern {filename_pattern!r} needs field {e} "
                             "which this row does not have") from None
        items.append(_item(rel, label, video_root))
    return Annotations(items, class_names)


# ----------------------------------------------------------------------------
# plain video lists (HowTo100M)


def _scan_videos(directory: str, exts: Sequence[str]) -> list[str]:
    """Relative paths of the video files under ``directory``, sorted."""
    lowered = tuple(e.lower() for e in exts)
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(lowered):
                found.append(os.path.relpath(os.path.join(dirpath, name), directory).replace(os.sep, "/"))
    return sorted(found)


def read_video_list(
    file_or_dir: str,
    exts: Sequence[str] = VIDEO_EXTS,
    video_root: str | None = None,
    ext: str = ".mp4",
) -> Annotations:
    """Unlabelled videos (HowTo100M pre-training).

    A directory is scanned recursively for files ending in ``exts`` (paths
    sorted, so the order is deterministic; ``video_root`` defaults to it). A
    ``.csv`` file gives its ``video_id`` column (``HowTo100M_v1.csv``) or else
    its first column, header skipped; any other file gives the first
    whitespace-separated field of each line (so mmaction2 lists work too).
    Entries without one of ``exts`` get ``ext`` appended.
    """
    if os.path.isdir(file_or_dir):
        root = file_or_dir if video_root is None else video_root
        return Annotations([_item(rel, None, root) for rel in _scan_videos(file_or_dir, exts)], None)
    _require_file(file_or_dir, "video list")
    entries: list[str] = []
    if file_or_dir.lower().endswith(".csv"):
        with open(file_or_dir, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f))
        if rows:
            header = [h.strip() for h in rows[0]]
            column = header.index("video_id") if "video_id" in header else 0
            for lineno, row in enumerate(rows[1:], start=2):
                if not row or not "".join(row).strip():
                    continue
                if column >= len(row) or not row[column].strip():
                    raise ValueError(f"{file_or_dir}:{lineno}: empty video id")
                entries.append(row[column].strip())
    else:
        for raw in _read_lines(file_or_dir, "video list"):
            line = raw.strip()
            if line and not _is_comment(line):
                entries.append(line.split()[0])
    lowered = tuple(e.lower() for e in exts)
    items = [_item(e if e.lower().endswith(lowered) else e + ext, None, video_root) for e in entries]
    return Annotations(items, None)


# ----------------------------------------------------------------------------
# dispatch and writing

DATASET_READERS = {
    "ucf101": read_ucf101,
    "hmdb51": read_hmdb51,
    "ssv2": read_ssv2,
    "sthv2": read_ssv2,  # mmaction2 / released-code name
    "diving48": read_diving48,
    "kinetics400": read_kinetics,
    "kinetics": read_kinetics,
    "howto100m": read_video_list,
    "list": read_mmaction_list,
}


def read_annotations(name: str, **kwargs) -> Annotations:
    """Call the reader for dataset ``name`` with ``kwargs`` (the reader's own arguments)."""
    key = name.lower()
    if key not in DATASET_READERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASET_READERS))}")
    return DATASET_READERS[key](**kwargs)


def write_mmaction_list(
    items: Iterable[VideoItem],
    path: str,
    video_root: str | None = None,
    unlabeled_label: int | None = None,
) -> int:
    """Write ``items`` as an mmaction2 video list; returns the number of lines.

    Paths are written relative to ``video_root`` when given, so that reading
    the list back with the same root gives the same paths and video ids.
    Unlabelled items are written as ``path`` alone, or with
    ``unlabeled_label`` (the released tokenizer expects two fields per line
    and used a fake label for HowTo100M). The file is replaced atomically.
    """
    lines = []
    for it in items:
        rel = it.path if video_root is None else os.path.relpath(it.path, video_root).replace(os.sep, "/")
        if not rel or any(c.isspace() for c in rel):
            raise ValueError(f"cannot write {it.path!r} to a list file: the path is empty or contains whitespace")
        label = it.label if it.label is not None else unlabeled_label
        lines.append(rel if label is None else f"{rel} {int(label)}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    io_utils.write_text_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)


def unique_by_video_id(items: Iterable[VideoItem]) -> list[VideoItem]:
    """Drop repeated video ids, keeping the first (the released tokenizer does
    this when it concatenates all UCF101/HMDB51 split lists); a repeat with a
    different label is an error."""
    seen: dict[str, VideoItem] = {}
    out = []
    for it in items:
        prev = seen.get(it.video_id)
        if prev is None:
            seen[it.video_id] = it
            out.append(it)
        elif prev.label != it.label:
            raise ValueError(f"video {it.video_id!r} appears with labels {prev.label} and {it.label}")
    return out
