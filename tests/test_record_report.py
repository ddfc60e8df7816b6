"""`scripts/record_quant.py --report`: the results table built from a folder of records."""

import json

import pytest

from script_loader import load_script



def record_quant():
    return load_script("scripts/record_quant.py")


def record(recipe, wiki, c4=None, kv=None, nbytes=2**20):
    results = {"wikitext2": {"ppl": wiki, "windows": 148}}
    if c4 is not None:
        results["c4"] = {"ppl": c4, "windows": 256}
    applied = {"kv_cache": kv} if kv else {}
    return {"recipe": recipe, "model": "smollm2-135m", "dtype": "float32", "results": results,
            "recipe_config": {"applied": applied}, "model_bytes": nbytes, "git_commit": "abc1234",
            "device": "gpu:test"}


def test_table_rows_changes_and_kv_columns(tmp_path):
    kv = {"codec": "kivi-k2v2-g32-r128", "bytes_per_token": 4771.2, "context": 8192, "compression_ratio": 4.83}
    for name, rec in {"baseline": record("baseline", 20.0, 30.0),
                      "kivi_k2v2": record("kivi_k2v2", 22.0, kv=kv),
                      "rtn_w4_g128": record("rtn_w4_g128", 25.0, 36.0, nbytes=2**19)}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(rec))
    (tmp_path / "notes.json").write_text(json.dumps({"unrelated": 1}))  # not a record: ignored
    lines = record_quant().report_table(str(tmp_path)).splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| recipe")]
    assert [r.split(" | ")[0] for r in rows] == ["| baseline", "| kivi_k2v2", "| rtn_w4_g128"]
    assert rows[1] == ("| kivi_k2v2 | 22.000 (148 win) | +10.00% | - | - | 1.0 | kivi-k2v2-g32-r128 "
                       "| 4,771 (at 8192) | 4.83x |")
    assert rows[2] == "| rtn_w4_g128 | 25.000 (148 win) | +25.00% | 36.000 (256 win) | +20.00% | 0.5 | - | - | - |"


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no record_quant.py records"):
        record_quant().report_table(str(tmp_path))
