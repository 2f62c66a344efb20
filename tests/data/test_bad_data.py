"""Bad data: every kind of bad row is an error naming its file and row; --skip-bad-rows skips and counts them."""

from __future__ import annotations

import json

import pytest

from prefixtune.data import MAX_TEXT_CHARS, DataError, load_data

GOOD = [{"text": "fine day", "label": "joy"}, {"text": "so sad", "label": "sadness"}]


def _write(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def _j(row) -> bytes:
    return json.dumps(row).encode()


BAD_ROWS = {  # kind -> (line 3 of a jsonl file, what the error says)
    "missing field": (_j({"txt": "typo", "label": "joy"}), "line 3: no 'text' field"),
    "non-string text": (_j({"text": 42, "label": "joy"}), "line 3: 'text' must be a string"),
    "empty text": (_j({"text": "  ", "label": "joy"}), "line 3: 'text' is empty"),
    "not json": (b'{"text": "cut off', "line 3: invalid JSON"),
    "not an object": (b"[1, 2]", "line 3: expected an object"),
    "huge line": (_j({"text": "x" * (MAX_TEXT_CHARS + 1), "label": "joy"}), "line 3: 'text' is 1,000,001 characters"),
    "non-utf8": (b'{"text": "caf\xe9", "label": "joy"}', "line 3: not valid UTF-8"),
    "missing label": (_j({"text": "no label"}), "line 3: no 'label' value"),
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_is_an_error_with_its_row_then_skipped_on_request(tmp_path, kind):
    line, message = BAD_ROWS[kind]
    path = _write(tmp_path / "train.jsonl", [_j(GOOD[0]), _j(GOOD[1]), line, _j(GOOD[0])])
    with pytest.raises(DataError, match=message.replace("[", r"\[")) as err:
        load_data(path)
    assert err.value.row == 3 or kind == "missing label"  # that one is found across rows, still named by line
    bundle = load_data(path, skip_bad_rows=True)
    assert len(bundle.split("train")) == 3 and len(bundle.skipped) == 1
    assert "line 3" in bundle.skipped[0]


def test_empty_file_is_refused_even_when_skipping(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b"\n  \n")
    for skip in (False, True):
        with pytest.raises(DataError, match="contains no examples"):
            load_data(str(tmp_path / "train.jsonl"), skip_bad_rows=skip)


def test_train_skips_bad_rows_and_says_how_many(tmp_path, tiny_model_dir, tiny_lm):
    from prefixtune.train.config import TrainConfig
    from prefixtune.train.run import train

    rows = [_j({"text": f"row {i} is fine", "label": "joy" if i % 2 else "sadness"}) for i in range(20)]
    rows[4] = b'{"text": 7, "label": "joy"}'
    rows[9] = b'{"text": "bad \xff bytes", "label": "joy"}'
    data = _write(tmp_path / "d.jsonl", rows)
    cfg = TrainConfig(model=str(tiny_model_dir), data=data, out=str(tmp_path / "run"), max_steps=1,
                      num_virtual_tokens=2, progress=False, device="cpu")
    with pytest.raises(DataError, match="line 10: not valid UTF-8"):
        train(cfg, loaded=tiny_lm)
    said = []
    cfg.skip_bad_rows = True
    result = train(cfg, loaded=tiny_lm, say=said.append)
    assert result.summary["steps"] == 1
    assert any("skipped 2 bad row(s)" in s for s in said)
