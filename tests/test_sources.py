"""Every source type yields the same records; every format normalises to the same chat."""

import json

import pytest
from conftest import write_jsonl

from tunesmith.data.formats import detect_format, normalize_all
from tunesmith.data.sources import read_records

ROWS = [{"instruction": "Name a color.", "input": "", "output": "Blue."},
        {"instruction": "Add.", "input": "2 and 3", "output": "5"}]


def test_jsonl_csv_parquet_and_datasets_folder_agree(tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    write_jsonl(tmp_path / "d.jsonl", ROWS)
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "hf"))
    for name in ("d.jsonl", "d.csv", "d.parquet", "hf"):
        records = read_records(tmp_path / name)
        assert [r.fields for r in records] == ROWS, name
    assert read_records(tmp_path / "d.jsonl")[1].where.endswith("d.jsonl:2")
    assert read_records(tmp_path / "d.csv")[1].where.endswith("d.csv:3")


@pytest.mark.parametrize("row,fmt", [
    (ROWS[1], "alpaca"),
    ({"conversations": [{"from": "human", "value": "Add.\n\n2 and 3"}, {"from": "gpt", "value": "5"}]}, "sharegpt"),
    ({"messages": [{"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]}, "messages"),
])
def test_formats_normalise_to_the_same_chat(tmp_path, row, fmt):
    records = read_records(write_jsonl(tmp_path / "x.jsonl", [row]))
    assert detect_format(records[0]) == fmt
    _, items = normalize_all(records)
    assert items[0].messages == [{"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]


def test_text_format_and_unknown_keys(tmp_path):
    records = read_records(write_jsonl(tmp_path / "t.jsonl", [{"text": "doc"}]))
    fmt, items = normalize_all(records)
    assert fmt == "text" and items[0].text == "doc"
    from tunesmith.errors import DataError

    with pytest.raises(DataError, match=r"u.jsonl:1: cannot tell the data format"):
        normalize_all(read_records(write_jsonl(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}])))
