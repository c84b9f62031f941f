"""Annotation readers, fed small files in each dataset's published format."""

import json
import os

import pytest

from vimpac_jax.data.annotations import (
    KINETICS_MMACTION2_PATTERN,
    Annotations,
    VideoItem,
    read_annotations,
    read_diving48,
    read_hmdb51,
    read_kinetics,
    read_label_map,
    read_mmaction_list,
    read_ssv2,
    read_ucf101,
    read_video_list,
    unique_by_video_id,
    write_mmaction_list,
)


def _write(path, text, newline=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline=newline) as f:
        f.write(text)
    return str(path)


# --------------------------------------------------------------------------- mmaction2 lists


def test_mmaction_list_labels_comments_and_root(tmp_path):
    f = _write(
        tmp_path / "ucf101_train_split_1_videos.txt",
        "# written by build_file_list.py\n"
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 0\n"
        "\n"
        "clap/#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi 4\n"
        "#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi\n",
    )
    ann = read_mmaction_list(f, video_root="/data/ucf101/videos")
    assert ann.class_names is None
    assert ann.items == [
        VideoItem("/data/ucf101/videos/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", 0,
                  "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01"),
        VideoItem("/data/ucf101/videos/clap/#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi", 4,
                  "clap/#20_Rhythm_clap_u_nm_np1_fr_goo_0"),
        # a leading '#' glued to a name is an HMDB51 file, not a comment
        VideoItem("/data/ucf101/videos/#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi", None,
                  "#20_Rhythm_clap_u_nm_np1_fr_goo_0"),
    ]
    no_root = read_mmaction_list(f)
    assert no_root.items[0].path == "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"


def test_mmaction_list_errors_name_file_and_line(tmp_path):
    f = _write(tmp_path / "l.txt", "a.mp4 1\nb.mp4 x\n")
    with pytest.raises(ValueError, match=r"l\.txt:2: label must be an integer, got 'x'"):
        read_mmaction_list(f)
    f = _write(tmp_path / "raw.txt", "a.mp4 1\n\nApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01 120 0\n")
    with pytest.raises(ValueError, match=r"raw\.txt:3: expected 'path \[label\]', got 3 fields"):
        read_mmaction_list(f)
    with pytest.raises(FileNotFoundError, match="video list not found: .*missing.txt"):
        read_mmaction_list(str(tmp_path / "missing.txt"))
    f = _write(tmp_path / "k.txt", "a.mp4 0\nb.mp4 2\n")
    with pytest.raises(ValueError, match=r"k\.txt: label 2 of 'b' is outside \[0, 2\)"):
        read_mmaction_list(f, class_names=["x", "y"])


def test_write_then_read_round_trip(tmp_path):
    items = [
        VideoItem("/v/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", 0, "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01"),
        VideoItem("/v/nVbIUDjzWY4.mp4", None, "nVbIUDjzWY4"),
    ]
    out = str(tmp_path / "sub" / "list.txt")
    assert write_mmaction_list(items, out, video_root="/v") == 2
    assert open(out).read() == "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 0\nnVbIUDjzWY4.mp4\n"
    assert read_mmaction_list(out, video_root="/v").items == items
    write_mmaction_list(Annotations(items), out, video_root="/v", unlabeled_label=-1)
    assert open(out).read().splitlines()[1] == "nVbIUDjzWY4.mp4 -1"
    with pytest.raises(ValueError, match="whitespace"):
        write_mmaction_list([VideoItem("/v/passing American football (in game)/x.mp4", 1, "x")], out)


def test_label_map_and_unique(tmp_path):
    f = _write(tmp_path / "label_map.txt", "Back+15som+05Twis+FREE\nBack+15som+15Twis+FREE\n\n")
    assert read_label_map(f) == ["Back+15som+05Twis+FREE", "Back+15som+15Twis+FREE"]
    a, b = VideoItem("p/a.avi", 1, "p/a"), VideoItem("p/b.avi", 2, "p/b")
    assert unique_by_video_id([a, b, a]) == [a, b]
    with pytest.raises(ValueError, match="'p/a' appears with labels 1 and 3"):
        unique_by_video_id([a, VideoItem("q/a.avi", 3, "p/a")])


# --------------------------------------------------------------------------- UCF101


@pytest.fixture
def ucf_dir(tmp_path):
    d = tmp_path / "ucfTrainTestlist"
    # The official files use CRLF line endings.
    _write(d / "classInd.txt", "1 ApplyEyeMakeup\r\n2 ApplyLipstick\r\n3 Archery\r\n4 HandstandPushups\r\n",
           newline="")
    _write(d / "trainlist01.txt",
           "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\n"
           "ApplyLipstick/v_ApplyLipstick_g08_c01.avi 2\r\n"
           "HandstandPushups/v_HandStandPushups_g08_c01.avi 4\r\n", newline="")
    _write(d / "testlist01.txt",
           "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\r\n"
           "Archery/v_Archery_g01_c01.avi\r\n", newline="")
    _write(d / "trainlist02.txt", "Archery/v_Archery_g01_c01.avi 3\r\n", newline="")
    return str(d)


def test_ucf101_official(ucf_dir):
    train = read_ucf101(ucf_dir, split=1, subset="train", video_root="/data/UCF-101")
    assert train.class_names == ["ApplyEyeMakeup", "ApplyLipstick", "Archery", "HandstandPushups"]
    assert [(i.video_id, i.label) for i in train] == [
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01", 0),
        ("ApplyLipstick/v_ApplyLipstick_g08_c01", 1),
        ("HandstandPushups/v_HandStandPushups_g08_c01", 3),
    ]
    assert train.items[0].path == "/data/UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"
    # testlist has no labels: they come from the class folder
    test = read_ucf101(ucf_dir, split=1, subset="test")
    assert [(i.path, i.label) for i in test] == [
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", 0), ("Archery/v_Archery_g01_c01.avi", 2)]
    assert read_ucf101(ucf_dir, split=1, subset="val").items == test.items
    assert [i.video_id for i in read_ucf101(ucf_dir, split=2)] == ["Archery/v_Archery_g01_c01"]
    assert read_annotations("ucf101", annotation_dir=ucf_dir, split=1, subset="test").items == test.items


def test_ucf101_errors(ucf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"UCF101 test list not found: .*testlist02\.txt"):
        read_ucf101(ucf_dir, split=2, subset="test")
    with pytest.raises(ValueError, match="split must be 1, 2 or 3"):
        read_ucf101(ucf_dir, split=4)
    with pytest.raises(ValueError, match="subset must be"):
        read_ucf101(ucf_dir, subset="dev")
    _write(tmp_path / "ucfTrainTestlist" / "trainlist03.txt",
           "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nYoYo/v_YoYo_g08_c01.avi 101\n")
    with pytest.raises(ValueError, match=r"trainlist03\.txt:2: class folder 'YoYo' is not in classInd\.txt"):
        read_ucf101(ucf_dir, split=3)
    _write(tmp_path / "ucfTrainTestlist" / "trainlist03.txt", "Archery/v_Archery_g01_c01.avi 1\n")
    with pytest.raises(ValueError,
                       match=r"trainlist03\.txt:1: label 1 disagrees with classInd\.txt \('Archery' is 3\)"):
        read_ucf101(ucf_dir, split=3)
    _write(tmp_path / "ucfTrainTestlist" / "classInd.txt", "1 ApplyEyeMakeup\n2 ApplyLipstick\n37 HandstandPushups\n")
    with pytest.raises(ValueError, match=r"classInd\.txt:3: class index 37, expected 3"):
        read_ucf101(ucf_dir)
    with pytest.raises(FileNotFoundError, match="no UCF101 annotations in .*classInd.txt.*ucf101_train_split_1"):
        read_ucf101(str(tmp_path / "empty"))


def test_ucf101_mmaction2_list(tmp_path):
    d = tmp_path / "ucf101"
    _write(d / "ucf101_val_split_1_videos.txt",
           "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 0\nArchery/v_Archery_g01_c01.avi 2\n"
           "ApplyLipstick/v_ApplyLipstick_g01_c01.avi 1\n")
    ann = read_ucf101(str(d), split=1, subset="test", video_root="/v")
    assert [(i.video_id, i.label) for i in ann] == [
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01", 0), ("Archery/v_Archery_g01_c01", 2),
        ("ApplyLipstick/v_ApplyLipstick_g01_c01", 1)]
    # without classInd.txt the names are recovered from the class folders
    assert ann.class_names == ["ApplyEyeMakeup", "ApplyLipstick", "Archery"]


# --------------------------------------------------------------------------- HMDB51


@pytest.fixture
def hmdb_dir(tmp_path):
    d = tmp_path / "testTrainMulti_7030_splits"
    # official lines end with a trailing space
    _write(d / "brush_hair_test_split1.txt",
           "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 \n"
           "April_09_brush_hair_u_nm_np1_ba_goo_1.avi 2 \n"
           "Blonde_being_brushed_brush_hair_f_nm_np2_ri_med_0.avi 0 \n")
    _write(d / "clap_test_split1.txt",
           "#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi 2 \n"
           "#20_Rhythm_clap_u_nm_np1_fr_goo_1.avi 1 \n")
    _write(d / "flic_flac_test_split1.txt", "Outdoor-Turnen_flic_flac_f_cm_np1_ri_med_2.avi 1 \n")
    _write(d / "cartwheel_test_split1.txt", "Bodenturnen_2004_cartwheel_f_cm_np1_le_med_0.avi 1 \n")
    _write(d / "brush_hair_test_split2.txt", "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 2 \n")
    return str(d)


def test_hmdb51_official(hmdb_dir):
    train = read_hmdb51(hmdb_dir, split=1, subset="train", video_root="/data/hmdb51")
    # classes sorted by name (mmaction2's order), not file-system order
    assert train.class_names == ["brush_hair", "cartwheel", "clap", "flic_flac"]
    assert [(i.video_id, i.label) for i in train] == [
        ("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0", 0),
        ("cartwheel/Bodenturnen_2004_cartwheel_f_cm_np1_le_med_0", 1),
        ("clap/#20_Rhythm_clap_u_nm_np1_fr_goo_1", 2),
        ("flic_flac/Outdoor-Turnen_flic_flac_f_cm_np1_ri_med_2", 3),
    ]
    assert train.items[0].path == "/data/hmdb51/brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi"
    test = read_hmdb51(hmdb_dir, split=1, subset="test")
    assert [i.video_id for i in test] == ["brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_1",
                                          "clap/#20_Rhythm_clap_u_nm_np1_fr_goo_0"]
    # the unused (0) video is in neither subset
    split2 = read_hmdb51(hmdb_dir, split=2, subset="test")
    assert split2.class_names == ["brush_hair"] and len(split2) == 1
    assert read_annotations("hmdb51", split_dir=hmdb_dir, split=1, subset="val").items == test.items


def test_hmdb51_errors_and_mmaction2(hmdb_dir, tmp_path):
    _write(tmp_path / "testTrainMulti_7030_splits" / "chew_test_split1.txt", "a.avi 1\nb.avi 3\n")
    with pytest.raises(ValueError, match=r"chew_test_split1\.txt:2: expected '<video>\.avi <0\|1\|2>', got 'b\.avi 3'"):
        read_hmdb51(hmdb_dir, split=1)
    with pytest.raises(FileNotFoundError, match="no HMDB51 annotations in"):
        read_hmdb51(hmdb_dir, split=3)
    d = tmp_path / "hmdb51"
    _write(d / "hmdb51_train_split_1_videos.txt",
           "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi 0\n"
           "flic_flac/Outdoor-Turnen_flic_flac_f_cm_np1_ri_med_2.avi 14\n")
    ann = read_hmdb51(str(d), split=1, subset="train")
    assert [i.label for i in ann] == [0, 14]
    assert ann.class_names is None  # labels 1..13 absent: names cannot be recovered


# --------------------------------------------------------------------------- SSV2


@pytest.fixture
def ssv2_files(tmp_path):
    labels = {"Approaching something with your camera": "0",
              "Putting something on a surface": "1",
              "Putting something on something": "2",
              "Pretending to pick something up": "3"}
    train = [
        {"id": "78687", "label": "putting potato on a plate", "template": "Putting [something] on [something]",
         "placeholders": ["potato", "a plate"]},
        {"id": "42326", "label": "approaching a cup with your camera",
         "template": "Approaching [something] with your camera", "placeholders": ["a cup"]},
    ]
    lj = _write(tmp_path / "something-something-v2-labels.json", json.dumps(labels))
    tj = _write(tmp_path / "something-something-v2-train.json", json.dumps(train))
    testj = _write(tmp_path / "something-something-v2-test.json", json.dumps([{"id": "1420"}]))
    return tj, lj, testj


def test_ssv2(ssv2_files):
    tj, lj, testj = ssv2_files
    ann = read_ssv2(tj, lj, video_root="/data/20bn-something-something-v2")
    assert ann.class_names[2] == "Putting something on something" and ann.num_classes == 4
    assert ann.items == [
        VideoItem("/data/20bn-something-something-v2/78687.webm", 2, "78687"),
        VideoItem("/data/20bn-something-something-v2/42326.webm", 0, "42326"),
    ]
    test = read_ssv2(testj, None)
    assert test.items == [VideoItem("1420.webm", None, "1420")]
    assert read_annotations("sthv2", train_or_val_json=tj, labels_json=lj).items[0].label == 2


def test_ssv2_errors(ssv2_files, tmp_path):
    tj, lj, _ = ssv2_files
    bad = _write(tmp_path / "bad.json", json.dumps([{"id": "1", "template": "Spinning [something] around"}]))
    with pytest.raises(ValueError, match=r"bad\.json:entry 0: template 'Spinning \[something\] around' "
                                         r"\('Spinning something around'\) is not in .*labels\.json"):
        read_ssv2(bad, lj)
    noid = _write(tmp_path / "noid.json", json.dumps([{"template": "x"}]))
    with pytest.raises(ValueError, match=r"noid\.json:entry 0: missing field 'id'"):
        read_ssv2(noid, lj)
    with pytest.raises(ValueError, match="no labels_json"):
        read_ssv2(tj, None)
    broken = _write(tmp_path / "broken.json", "[{")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        read_ssv2(broken, lj)


# --------------------------------------------------------------------------- Diving48


def test_diving48(tmp_path):
    vocab = [["Back", "15som", "05Twis", "FREE"], ["Back", "15som", "15Twis", "FREE"],
             ["Back", "15som", "25Twis", "FREE"]]
    train = [{"vid_name": "-mmq0PT-u8k_00155", "label": 2, "start_frame": 0, "end_frame": 59},
             {"vid_name": "_8Vy3dlHg2w_00000", "label": 0, "start_frame": 0, "end_frame": 99}]
    vj = _write(tmp_path / "Diving48_vocab.json", json.dumps(vocab))
    tj = _write(tmp_path / "Diving48_V2_train.json", json.dumps(train))
    ann = read_diving48(tj, vj, video_root="/data/diving48/rgb")
    assert ann.class_names == ["Back+15som+05Twis+FREE", "Back+15som+15Twis+FREE", "Back+15som+25Twis+FREE"]
    assert ann.items == [VideoItem("/data/diving48/rgb/-mmq0PT-u8k_00155.mp4", 2, "-mmq0PT-u8k_00155"),
                         VideoItem("/data/diving48/rgb/_8Vy3dlHg2w_00000.mp4", 0, "_8Vy3dlHg2w_00000")]
    assert read_diving48(tj).class_names is None
    assert read_annotations("diving48", json_file=tj).items[0].video_id == "-mmq0PT-u8k_00155"

    bad = _write(tmp_path / "bad.json", json.dumps([train[0], {"vid_name": "x_00001"}]))
    with pytest.raises(ValueError, match=r"bad\.json:entry 1: missing field 'label'"):
        read_diving48(bad)
    out = _write(tmp_path / "out.json", json.dumps([{"vid_name": "x_00001", "label": 3}]))
    with pytest.raises(ValueError, match=r"out\.json: label 3 of 'x_00001' is outside \[0, 3\)"):
        read_diving48(out, vj)


# --------------------------------------------------------------------------- Kinetics


K400_TRAIN = (
    "label,youtube_id,time_start,time_end,split,is_cc\n"
    "zumba,--0NTAs-ZGA,30,40,train,0\n"
    '"passing American football (in game)",-0qOcrLIe3I,12,22,train,0\n'
    "abseiling,--07WQ2iBlw,1,11,train,0\n"
    "passing American football (not in game),0aLtCbWq9d8,95,105,train,0\n"
)


def test_kinetics(tmp_path):
    f = _write(tmp_path / "kinetics_train.csv", K400_TRAIN)
    ann = read_kinetics(f, video_root="/data/k400/videos_train")
    assert ann.class_names == ["abseiling", "passing American football (in game)",
                               "passing American football (not in game)", "zumba"]
    assert [(i.video_id, i.label) for i in ann] == [
        ("--0NTAs-ZGA_000030_000040", 3), ("-0qOcrLIe3I_000012_000022", 1),
        ("--07WQ2iBlw_000001_000011", 0), ("0aLtCbWq9d8_000095_000105", 2)]
    assert ann.items[2].path == "/data/k400/videos_train/--07WQ2iBlw_000001_000011.mp4"
    mm = read_kinetics(f, filename_pattern=KINETICS_MMACTION2_PATTERN)
    assert mm.items[1].path == "passing_American_football_(in_game)/-0qOcrLIe3I_000012_000022.mp4"
    assert read_annotations("kinetics400", csv_file=f).items == read_kinetics(f).items


def test_kinetics_val_uses_train_classes_and_test_has_no_labels(tmp_path):
    train = _write(tmp_path / "kinetics_train.csv", K400_TRAIN)
    val = _write(tmp_path / "kinetics_val.csv",
                 "label,youtube_id,time_start,time_end,split,is_cc\nzumba,0wR5jVB-WPk,417,427,val,0\n")
    assert read_kinetics(val).items[0].label == 0  # numbered within its own file ...
    assert read_kinetics(val, classes_csv=train).items[0].label == 3  # ... unless told the train classes
    test = _write(tmp_path / "kinetics_test.csv", "youtube_id,time_start,time_end,split\n--aOxStW1SU,0,10,test\n")
    t = read_kinetics(test, classes_csv=train)
    assert t.items == [VideoItem("--aOxStW1SU_000000_000010.mp4", None, "--aOxStW1SU_000000_000010")]
    with pytest.raises(ValueError, match=r"kinetics_test\.csv:2: filename_pattern .* needs field 'label_dir'"):
        read_kinetics(test, filename_pattern=KINETICS_MMACTION2_PATTERN)


def test_kinetics_errors(tmp_path):
    f = _write(tmp_path / "k.csv", "label,youtube_id,time_begin,time_end\nabseiling,x,1,11\n")
    with pytest.raises(ValueError, match=r"k\.csv: missing column 'time_start'"):
        read_kinetics(f)
    f = _write(tmp_path / "k2.csv", "label,youtube_id,time_start,time_end,split\nabseiling,x,1,11,train\n"
                                    "abseiling,y,one,11,train\n")
    with pytest.raises(ValueError, match=r"k2\.csv:3: field 'time_start' must be a number, got 'one'"):
        read_kinetics(f)
    train = _write(tmp_path / "train.csv", K400_TRAIN)
    f = _write(tmp_path / "k3.csv", "label,youtube_id,time_start,time_end,split\nyoyo,y,1,11,val\n")
    with pytest.raises(ValueError, match=r"k3\.csv:2: label 'yoyo' is not a class of .*train\.csv"):
        read_kinetics(f, classes_csv=train)
    with pytest.raises(FileNotFoundError, match="Kinetics CSV not found"):
        read_kinetics(str(tmp_path / "nope.csv"))


# --------------------------------------------------------------------------- HowTo100M / plain lists


def test_video_list_file_csv_and_dir(tmp_path):
    f = _write(tmp_path / "ids.txt", "nVbIUDjzWY4\n\n# comment\n0sYvbOkMXQ4.webm\nsub/clip.mp4 3\n")
    ann = read_video_list(f, video_root="/data/howto100m")
    assert ann.items == [VideoItem("/data/howto100m/nVbIUDjzWY4.mp4", None, "nVbIUDjzWY4"),
                         VideoItem("/data/howto100m/0sYvbOkMXQ4.webm", None, "0sYvbOkMXQ4"),
                         VideoItem("/data/howto100m/sub/clip.mp4", None, "sub/clip")]
    c = _write(tmp_path / "HowTo100M_v1.csv",
               "video_id,category_1,category_2,rank,task_id\n"
               "nVbIUDjzWY4,Cars & Other Vehicles,Motorcycles,27,52907\n"
               "CTPAZ2euJ2Q,Cars & Other Vehicles,Motorcycles,35,109057\n")
    assert [i.video_id for i in read_video_list(c)] == ["nVbIUDjzWY4", "CTPAZ2euJ2Q"]

    root = tmp_path / "videos"
    for rel in ["b/2.webm", "a/1.mp4", "a/0.MKV", "a/notes.txt", "c.mp4"]:
        _write(root / rel, "")
    scanned = read_video_list(str(root))
    assert [i.video_id for i in scanned] == ["a/0", "a/1", "b/2", "c"]
    assert scanned.items[1].path == os.path.join(str(root), "a/1.mp4")
    assert read_annotations("howto100m", file_or_dir=str(root)).items == scanned.items
    with pytest.raises(FileNotFoundError, match="video list not found"):
        read_video_list(str(tmp_path / "missing"))


def test_read_annotations_unknown_name():
    with pytest.raises(ValueError, match="unknown dataset 'ucf102'; known: .*hmdb51"):
        read_annotations("ucf102")
