"""Sources as users have them: gzip-compressed JSON Lines / JSON (HH-RLHF ships as
`harmless-base/test.jsonl.gz`), and hub datasets with a configuration and a data folder
(`load_dataset("Anthropic/hh-rlhf", data_dir="harmless-base")`, as its dataset card shows). The
hub cannot be reached here: `datasets.load_dataset` is replaced by a stub that records its
arguments and returns an in-memory dataset of real rows."""

from __future__ import annotations

import gzip
import json

import pytest

from conftest import TEST_DATA
from dpokit.config import DataConfig
from dpokit.data import read_pairs
from dpokit.data.sources import parse_hub_spec
from dpokit.errors import DpokitError

# 20 real rows of each (tests/data/SOURCES.md): HH-RLHF transcripts, UltraFeedback conversations.
HH = TEST_DATA / "hh_rlhf_harmless_base_first20.jsonl"
UF = TEST_DATA / "ultrafeedback_binarized_prefs_20short.jsonl"
CUT_HH = None  # stands for the HH-RLHF rows' gzip stream cut short (built in the test)


def _pairs(spec, data=None):
    reader = read_pairs(str(spec), data)
    return [(p.prompt, p.chosen, p.rejected, p.index) for p in reader], reader.stats


@pytest.mark.parametrize("sample", [HH, UF], ids=["hh-rlhf", "ultrafeedback"])
def test_gzip_json_lines_read_as_the_plain_file(tmp_path, sample):
    compressed = tmp_path / (sample.name + ".gz")
    compressed.write_bytes(gzip.compress(sample.read_bytes()))
    plain, plain_stats = _pairs(sample)
    unpacked, stats = _pairs(compressed)
    assert unpacked == plain and len(plain) == 20
    assert (stats.kind, stats.unit, stats.layout, stats.skipped) == ("jsonl.gz", "line", plain_stats.layout,
                                                                     plain_stats.skipped)


def test_gzip_json_array(tmp_path):
    rows = [json.loads(line) for line in UF.read_text(encoding="utf-8").splitlines()[:20]]
    path = tmp_path / "uf.json.gz"
    path.write_bytes(gzip.compress(json.dumps(rows).encode()))
    pairs, stats = _pairs(path)
    assert stats.kind == "json.gz" and stats.rows_read == 20
    assert pairs[0][1] == rows[0]["chosen"][1:]  # the assistant reply after the user turn


@pytest.mark.parametrize("name, content, message", [
    ("cut.jsonl.gz", CUT_HH, r"^cut.jsonl.gz: the gzip stream breaks after line \d+"),
    ("fake.jsonl.gz", b"not gzip at all", r"^fake.jsonl.gz: not a readable gzip file"),
    ("data.jsonl.zst", b"(\xb5/\xfd", r"^data.jsonl.zst: zstd-compressed data is not read"),
    ("data.csv.gz", gzip.compress(b"a,b\n1,2\n"), r"^data.csv.gz: only .jsonl.gz, .ndjson.gz and .json.gz"),
])
def test_broken_or_unsupported_compressed_files_are_one_line(tmp_path, monkeypatch, name, content, message):
    monkeypatch.chdir(tmp_path)
    if content is CUT_HH:
        whole = gzip.compress(HH.read_bytes())
        content = whole[: len(whole) // 2]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DpokitError, match=message) as info:
        _pairs(name)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec, flag, expected", [
    ("Anthropic/hh-rlhf", None, ("Anthropic/hh-rlhf", "train", None)),
    ("Anthropic/hh-rlhf:test", None, ("Anthropic/hh-rlhf", "test", None)),
    ("HuggingFaceH4/ultrafeedback_binarized:default:test_prefs", None,
     ("HuggingFaceH4/ultrafeedback_binarized", "test_prefs", "default")),
    ("org/name:test", "cfg", ("org/name", "test", "cfg")),
    ("org/name:cfg:test", "cfg", ("org/name", "test", "cfg")),
])
def test_hub_spec_parsing(spec, flag, expected):
    assert parse_hub_spec(spec, flag) == expected


@pytest.fixture
def hub_stub(monkeypatch):
    """`datasets.load_dataset` replaced: records its call, returns 5 real HH-RLHF rows."""
    import datasets

    calls = []
    rows = [json.loads(line) for line in HH.read_text(encoding="utf-8").splitlines()[:5]]

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, rows


def test_hub_config_and_data_dir_reach_load_dataset(hub_stub):
    calls, rows = hub_stub
    pairs, stats = _pairs("Anthropic/hh-rlhf:default:test", DataConfig(data_dir="harmless-base"))
    assert calls == [("Anthropic/hh-rlhf", "default", {"data_dir": "harmless-base", "split": "test"})]
    assert stats.source == "Anthropic/hh-rlhf:default:test (data_dir harmless-base)" and len(pairs) == 5
    assert pairs[0][0] + pairs[0][1] == rows[0]["chosen"]
    _pairs("Anthropic/hh-rlhf", DataConfig(data_config="default"))
    assert calls[-1] == ("Anthropic/hh-rlhf", "default", {"data_dir": None, "split": "train"})


def test_hub_flags_through_the_cli(hub_stub, capsys):
    from dpokit import cli

    calls, _ = hub_stub
    code = cli.main(["data", "inspect", "Anthropic/hh-rlhf:test", "--data-config", "default",
                     "--data-dir", "harmless-base", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["rows_kept"] == 5
    assert calls == [("Anthropic/hh-rlhf", "default", {"data_dir": "harmless-base", "split": "test"})]


def test_hub_options_contradicting_or_on_a_local_file_are_one_line(hub_stub):
    with pytest.raises(DpokitError, match=r"names config 'a' but --data-config is 'b'; keep one$"):
        _pairs("org/name:a:train", DataConfig(data_config="b"))
    with pytest.raises(DpokitError, match=r"--data-config / --data-dir apply to hub datasets only; .* is a local jsonl$"):
        _pairs(HH, DataConfig(data_dir="harmless-base"))
    assert hub_stub[0] == []


@pytest.mark.parametrize("compressed", [False, True], ids=["jsonl", "jsonl.gz"])
def test_a_large_json_lines_file_streams_row_by_row(tmp_path, compressed):
    """Reading and normalising holds one row at a time: the peak of Python allocations stays a
    small fraction of what the rows would take as Python objects held together (~2 KiB each here)."""
    import tracemalloc

    rows = [json.loads(line) for line in UF.read_text(encoding="utf-8").splitlines()]
    text = "".join(json.dumps(rows[i % len(rows)]) + "\n" for i in range(4000))
    path = tmp_path / ("big.jsonl.gz" if compressed else "big.jsonl")
    path.write_bytes(gzip.compress(text.encode()) if compressed else text.encode())
    held = sum(len(line) for line in text.splitlines())  # a lower bound for the rows held as objects
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_pairs(str(path)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 200 * len(_pairs(UF)[0]) == 4000  # the 20 rows, 200 times over
    assert peak < held / 20, (peak, held)
