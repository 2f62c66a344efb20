"""Tests for prefixtune.data: every input format, split aliases, label handling and each error message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefixtune.data import DataBundle, DataError, Example, load_data

EMOTION = Path(__file__).resolve().parents[3] / "shared/data/emotion"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [{"text": " i am happy ", "label": "joy"}, {"text": "so sad", "label": "sadness"},
        {"text": "yay", "label": "joy"}]
EXPECTED = [Example("i am happy", "joy"), Example("so sad", "sadness"), Example("yay", "joy")]


# --- formats ---------------------------------------------------------------------------------------------

def test_jsonl_single_file_becomes_train(tmp_path: Path) -> None:
    bundle = load_data(str(write_jsonl(tmp_path / "mydata.jsonl", ROWS)))
    assert isinstance(bundle, DataBundle)
    assert list(bundle.splits) == ["train"]
    assert bundle.split("train") == EXPECTED  # text stripped, labels are names
    assert bundle.labels == ["joy", "sadness"]  # sorted, deterministic
    assert bundle.label_counts() == {"joy": 2, "sadness": 1}
    assert bundle.source == str(tmp_path / "mydata.jsonl")


def test_json_list(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert load_data(str(tmp_path / "d.json")).split("train") == EXPECTED


def test_json_file_holding_json_lines(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.json", ROWS)
    assert load_data(str(tmp_path / "d.json")).split("train") == EXPECTED


def test_csv_with_quotes_and_bom(tmp_path: Path) -> None:
    body = 'text,label\r\n" i am happy ",joy\r\n"so sad",sadness\r\n"yay", joy \r\n'  # labels stripped too
    (tmp_path / "d.csv").write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert load_data(str(tmp_path / "d.csv")).split("train") == EXPECTED
    (tmp_path / "q.csv").write_text('sentence,label\n"a, b; c ""quoted""",joy\n', encoding="utf-8")
    assert load_data(str(tmp_path / "q.csv"), text_field="sentence").split("train") == [
        Example('a, b; c "quoted"', "joy")]


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    assert load_data(str(tmp_path / "d.parquet")).split("train") == EXPECTED


def test_kaggle_txt_without_header_splits_on_last_semicolon(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("i am happy;joy\n\nwell; this is sad;sadness\n", encoding="utf-8")
    bundle = load_data(str(tmp_path / "train.txt"))
    assert bundle.split("train") == [Example("i am happy", "joy"), Example("well; this is sad", "sadness")]
    assert bundle.labels == ["joy", "sadness"]


@pytest.mark.parametrize("header", ["text;label", "text;label_name"])
def test_kaggle_txt_header_is_skipped(tmp_path: Path, header: str) -> None:
    (tmp_path / "d.txt").write_text(f"{header}\ni am happy;joy\nso sad;sadness\n", encoding="utf-8")
    bundle = load_data(str(tmp_path / "d.txt"))
    assert [e.text for e in bundle.split("train")] == ["i am happy", "so sad"]
    assert bundle.labels == ["joy", "sadness"]


def test_plain_txt_is_unlabelled(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("first line\n\n  second line  \n", encoding="utf-8")
    bundle = load_data(str(tmp_path / "d.txt"))
    assert bundle.split("train") == [Example("first line"), Example("second line")]
    assert bundle.labels is None
    assert bundle.label_counts() == {}


def test_jsonl_without_label_field_is_unlabelled(tmp_path: Path) -> None:
    bundle = load_data(str(write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}])))
    assert bundle.labels is None
    assert [e.label for e in bundle.split("train")] == [None, None]


def test_label_field_none_ignores_labels(tmp_path: Path) -> None:
    bundle = load_data(str(write_jsonl(tmp_path / "d.jsonl", ROWS)), label_field=None)
    assert bundle.labels is None and all(e.label is None for e in bundle.split("train"))


# --- folders and splits ----------------------------------------------------------------------------------

def test_folder_with_split_aliases(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    (tmp_path / "val.txt").write_text("happy again;joy\n", encoding="utf-8")
    write_jsonl(tmp_path / "TEST.jsonl", [{"text": "t", "label": "sadness"}])
    (tmp_path / "README.md").write_text("not data", encoding="utf-8")
    bundle = load_data(str(tmp_path))
    assert list(bundle.splits) == ["train", "validation", "test"]
    assert bundle.split("val") == bundle.split("dev") == bundle.split("valid") == [Example("happy again", "joy")]
    assert bundle.label_counts("validation") == {"joy": 1, "sadness": 0}


def test_folder_dev_alias_and_missing_split_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "dev.jsonl", ROWS[:1])
    bundle = load_data(str(tmp_path))
    assert list(bundle.splits) == ["train", "validation"]
    with pytest.raises(DataError, match=r"no 'test' split \(available: train, validation\)"):
        bundle.split("test")


def test_folder_with_two_files_for_one_split(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "val.jsonl", ROWS)
    write_jsonl(tmp_path / "dev.jsonl", ROWS)
    with pytest.raises(DataError, match=r"dev.jsonl and val.jsonl are all 'validation' data"):
        load_data(str(tmp_path))


def test_folder_with_hub_shards_under_data(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train-00000-of-00002.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "data" / "train-00001-of-00002.jsonl", ROWS[2:])
    assert load_data(str(tmp_path)).split("train") == EXPECTED


def test_folder_without_split_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "stuff.jsonl", ROWS)
    with pytest.raises(DataError, match=r"no split files found \(data files here: stuff.jsonl\)"):
        load_data(str(tmp_path))


# --- labels ----------------------------------------------------------------------------------------------

def test_integer_labels_with_names(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": 0}])
    bundle = load_data(str(path), label_names=["neg", "neu", "pos"])
    assert bundle.split("train") == [Example("a", "pos"), Example("b", "neg")]
    assert bundle.labels == ["neg", "neu", "pos"]  # the given order, unused names kept
    assert bundle.label_counts() == {"neg": 1, "neu": 0, "pos": 1}


def test_csv_integer_labels_with_names(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("text,label\na,1\nb,0\n", encoding="utf-8")
    assert [e.label for e in load_data(str(tmp_path / "d.csv"), label_names=["x", "y"]).split("train")] == ["y", "x"]


def test_integer_label_without_names(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "joy"}, {"text": "b", "label": 3}])
    with pytest.raises(DataError, match=r"d.jsonl, line 2: label 3 is an integer.*--label-names a,b,c"):
        load_data(str(path))


def test_integer_label_out_of_range(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 5}])
    with pytest.raises(DataError, match=r"d.jsonl, line 2: label 5 is out of range for 2 label names") as info:
        load_data(str(path), label_names=["x", "y"])
    assert info.value.row == 2 and info.value.path == str(path)


def test_label_not_in_given_names(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("text;label\nfine;joy\nhmm;bored\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.txt, line 3: label 'bored' is not one of the label names \(joy, sadness\)"):
        load_data(str(tmp_path / "d.txt"), label_names=["joy", "sadness"])


def test_some_rows_missing_label(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "joy"}, {"text": "b"}])
    with pytest.raises(DataError, match=r"d.jsonl, line 2: no 'label' value, but other rows .* have one"):
        load_data(str(path))


def test_bad_label_names_argument(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match=r"label names repeat joy"):
        load_data(str(path), label_names=["joy", "joy"])


# --- bad input -------------------------------------------------------------------------------------------

def test_missing_text_field_lists_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok", "label": "joy"}, {"sentence": "x", "label": "joy"}])
    with pytest.raises(DataError, match=r"d.jsonl, line 2: no 'text' field \(fields present: 'sentence', 'label'\)"
                                        r".*--text-field"):
        load_data(str(path))


def test_missing_text_field_in_csv_uses_file_line(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("sentence,label\nx,joy\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.csv, line 2: no 'text' field"):
        load_data(str(tmp_path / "d.csv"))


@pytest.mark.parametrize("text", ["", "   ", None])
def test_empty_text(tmp_path: Path, text: str | None) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"text": "fine"}, {"text": text}])
    with pytest.raises(DataError, match=r"d.jsonl, line 3: 'text' is empty"):
        load_data(str(path))


def test_bad_json_line(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.jsonl, line 3: invalid JSON"):
        load_data(str(tmp_path / "d.jsonl"))


def test_bad_json_list(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text('[\n{"text": "ok"},\n{"text": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.json, line 3: invalid JSON"):
        load_data(str(tmp_path / "d.json"))


def test_undecodable_file(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_bytes(b"text,label\n\xff\xfe bad,joy\n")
    with pytest.raises(DataError, match=r"d.csv, line 2: not valid UTF-8"):
        load_data(str(tmp_path / "d.csv"))


def test_corrupt_parquet(tmp_path: Path) -> None:
    (tmp_path / "d.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"d.parquet: cannot read parquet"):
        load_data(str(tmp_path / "d.parquet"))


def test_unsupported_extension(tmp_path: Path) -> None:
    (tmp_path / "d.xlsx").write_bytes(b"whatever")
    with pytest.raises(DataError, match=r"d.xlsx: unsupported file type '.xlsx'"):
        load_data(str(tmp_path / "d.xlsx"))
    (tmp_path / "train.tsv").write_text("a\tb\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train.tsv: unsupported file type '.tsv'"):
        load_data(str(tmp_path))


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.jsonl: contains no examples"):
        load_data(str(tmp_path / "d.jsonl"))


def test_missing_local_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing.jsonl: no such file or folder"):
        load_data(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match=r"no data source given"):
        load_data("  ")


def test_unknown_id_offline_gives_hub_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # so the id cannot accidentally exist as a local folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # datasets/huggingface_hub read the variable once at import; patch the constants if already imported.
    for module, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
        mod = pytest.importorskip(module)
        monkeypatch.setattr(mod, attr, True)
    with pytest.raises(DataError, match=r"'no-such-user-xyz/no-such-dataset' is not a local file or folder, and the "
                                        r"Hugging Face Hub is unreachable \(offline.*to work offline.*--data") as info:
        load_data("no-such-user-xyz/no-such-dataset")
    assert info.value.__suppress_context__  # no chained library trace behind the message


def test_max_examples_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"max_examples must be a positive number, got 0"):
        load_data(str(write_jsonl(tmp_path / "d.jsonl", ROWS)), max_examples=0)


# --- fingerprint and capping -----------------------------------------------------------------------------

def test_fingerprint_stable_and_content_sensitive(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first = load_data(str(path)).fingerprint
    assert len(first) == 16 and int(first, 16) >= 0
    assert load_data(str(path)).fingerprint == first
    (tmp_path / "same.json").write_text(json.dumps(ROWS), encoding="utf-8")  # same content, other format
    assert load_data(str(tmp_path / "same.json")).fingerprint == first
    write_jsonl(path, ROWS[:2] + [{"text": "yay!", "label": "joy"}])
    assert load_data(str(path)).fingerprint != first
    write_jsonl(path, ROWS[:2] + [{"text": "yay", "label": "sadness"}])
    assert load_data(str(path)).fingerprint != first


def test_max_examples_caps_each_split_after_validation(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", ROWS[:1])
    bundle = load_data(str(tmp_path), max_examples=2)
    assert bundle.split("train") == EXPECTED[:2] and bundle.split("test") == EXPECTED[:1]
    assert bundle.labels == ["joy", "sadness"]
    assert bundle.fingerprint != load_data(str(tmp_path)).fingerprint
    write_jsonl(tmp_path / "train.jsonl", ROWS + [{"text": "  "}])  # bad row past the cap is still reported
    with pytest.raises(DataError, match=r"train.jsonl, line 4: 'text' is empty"):
        load_data(str(tmp_path), max_examples=1)


# --- the real shared data --------------------------------------------------------------------------------

@pytest.mark.skipif(not (EMOTION / "train.jsonl").exists(), reason="shared emotion data not present")
def test_real_emotion_data() -> None:
    bundle = load_data(str(EMOTION))
    assert {s: len(e) for s, e in bundle.splits.items()} == {"train": 16000, "validation": 2000, "test": 2000}
    assert set(bundle.labels or []) == {"sadness", "joy", "love", "anger", "fear", "surprise"}
    assert bundle.labels == sorted(bundle.labels or [])
    counts = bundle.label_counts()
    assert counts["joy"] == 5362 and counts["surprise"] == 572 and sum(counts.values()) == 16000
    assert load_data(str(EMOTION)).fingerprint == bundle.fingerprint


# --- hub path (load_dataset replaced by an in-memory DatasetDict; no network) ----------------------------

def test_hub_classlabel_maps_to_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["sadness", "joy"])})
    loaded = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]}, features=features),
        "validation": datasets.Dataset.from_dict({"text": ["c"], "label": [1]}, features=features),
        "test": datasets.Dataset.from_dict({"text": ["d"], "label": [-1]}, features=features),  # GLUE-style
        "unsupervised": datasets.Dataset.from_dict({"text": ["e"], "label": [-1]}, features=features),
    })
    calls: list[str] = []
    monkeypatch.setattr(datasets, "load_dataset", lambda source: calls.append(source) or loaded)
    monkeypatch.chdir(tmp_path)
    bundle = load_data("someone/emotion")
    assert calls == ["someone/emotion"]
    assert list(bundle.splits) == ["train", "validation", "test"]
    assert bundle.labels == ["sadness", "joy"]  # ClassLabel order, not sorted
    assert bundle.split("train") == [Example("a", "joy"), Example("b", "sadness")]
    assert bundle.split("test") == [Example("d", None)]


def test_hub_failure_is_a_data_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def missing(source: str) -> None:
        raise FileNotFoundError(f"Dataset '{source}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"loading it from the Hugging Face Hub failed \(Dataset 'x/y' doesn't exist"
                                        r".*check the dataset id"):
        load_data("x/y")
