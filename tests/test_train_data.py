"""Training data: chat rendering with a prompt-masked loss, plain text, packing, deterministic order."""

import json

import numpy as np
import pytest

from jaxcompress.errors import ConfigError, UserError
from jaxcompress.train import data as D
from jaxcompress.train.config import DataConfig, SourceConfig


@pytest.fixture(scope="module")
def tok():
    return D.byte_tokenizer()


def test_byte_tokenizer_ids_are_bytes(tok):
    text = "héllo <x>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|pad|>"]) == [256, 257, 258]
    assert tok.eos_token_id == 257 and len(tok) == 259


def test_chat_example_masks_the_prompt(tok):
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    ex = D.encode_chat(tok, messages)
    full = tok.apply_chat_template(messages, tokenize=False)
    assert full == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    assert tok.decode(ex.ids.tolist()) == full
    # The targets are exactly the assistant's reply and its end-of-turn.
    assert tok.decode(ex.ids[ex.mask].tolist()) == "Hello!<|im_end|>\n"
    assert tok.decode(ex.ids[~ex.mask].tolist()) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert ex.mask[-1] and not ex.mask[0]


def test_multi_turn_trains_on_every_assistant_turn(tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "B1"}, {"role": "user", "content": "c"},
                {"role": "assistant", "content": "D2"}]
    ex = D.encode_chat(tok, messages)
    assert tok.decode(ex.ids[ex.mask].tolist()) == "B1<|im_end|>\nD2<|im_end|>\n"
    # Two separate target spans.
    assert np.count_nonzero(np.diff(ex.mask.astype(int)) == 1) == 2


def test_alpaca_records_and_template(tok):
    msgs = D.to_messages({"instruction": "Add.", "input": "1 and 2", "output": "3"}, "x")
    assert msgs == [{"role": "user", "content": "Add.\n\n1 and 2"}, {"role": "assistant", "content": "3"}]
    ex = D.encode_alpaca(tok, msgs)
    assert tok.decode(ex.ids[ex.mask].tolist()) == "3<|im_end|>"
    assert tok.decode(ex.ids[~ex.mask].tolist()).endswith("### Response:\n")
    share = D.to_messages({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]}, "x")
    assert [m["role"] for m in share] == ["user", "assistant"]
    with pytest.raises(UserError, match="record 3: a record needs instruction/output"):
        D.to_messages({"text": "x"}, "file.json record 3")


def test_alpaca_demo_file_loads(tok):
    cfg = DataConfig(sources=[SourceConfig(kind="instruct", name="alpaca", max_examples=20)], seq_len=64)
    examples = D.load_examples(cfg, tok)
    assert len(examples) == 20
    records = json.load(open(D.source_path(cfg.sources[0], None)))[:20]
    for ex, rec in zip(examples, records):
        assert tok.decode(ex.ids[ex.mask].tolist()) == rec["output"] + "<|im_end|>\n"


def test_text_is_cut_into_full_rows(tok):
    docs = ["abcdef", "ghij"]
    rows = D.text_examples(docs, tok, seq_len=4)
    stream = list(b"abcdef") + [257] + list(b"ghij") + [257]  # 12 tokens -> two pieces of 5
    assert len(rows) == 2
    assert rows[0].ids.tolist() == stream[:5] and rows[1].ids.tolist() == stream[5:10]
    assert all(r.mask.all() for r in rows)


def test_skip_drops_the_first_records_before_max_examples(tok, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["aa", "bb", "cc", "dd", "ee"]))
    assert D.read_documents(str(path), limit=2, skip=1) == ["bb", "cc"]
    assert D.read_documents(str(path), skip=4) == ["ee"]
    records = tmp_path / "inst.json"
    records.write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(4)]))
    got = D.instruct_examples(str(records), tok, "chat", limit=1, skip=2)
    assert len(got) == 1 and tok.decode(got[0].ids[got[0].mask].tolist()) == "a2<|im_end|>\n"
    # The C4 training documents of the recovery config start after the C4 perplexity text.
    cfg = DataConfig(sources=[SourceConfig(kind="text", name="c4_validation", skip=1100, max_examples=1)])
    first = json.loads(open(D.source_path(cfg.sources[0], None)).readlines()[1100])["text"]
    assert D.read_documents(D.source_path(cfg.sources[0], None), 1, 1100) == [first]
    with pytest.raises(ConfigError, match=r"data.sources\[0\].skip=-1 must be >= 0"):
        from jaxcompress.train.config import TrainConfig, parse

        parse(TrainConfig, {"steps": 1, "data": {"sources": [{"kind": "text", "name": "c4", "skip": -1}]}})


def test_pack_layout_by_hand():
    ex = lambda ids, mask: D.Example(np.asarray(ids, np.int32), np.asarray(mask, bool))  # noqa: E731
    # The last example has no target: it is dropped.
    examples = [ex([1, 2, 3, 4], [0, 0, 1, 1]), ex([5, 6, 7], [0, 1, 1]),
                ex([8, 9, 10, 11, 12, 13, 14, 15], [0] + [1] * 7), ex([16, 17], [0, 0])]
    rows = D.pack(examples, seq_len=6, packing=True, pad_id=0)
    # Row 0: example 1 (3 predictions) + example 2 (2); row 1: example 3's 7 truncated to 6.
    assert rows.tokens.tolist() == [[1, 2, 3, 5, 6, 0], [8, 9, 10, 11, 12, 13]]
    assert rows.targets.tolist() == [[2, 3, 4, 6, 7, 0], [9, 10, 11, 12, 13, 14]]
    assert rows.weights.tolist() == [[0, 1, 1, 1, 1, 0], [1] * 6]
    assert rows.positions.tolist() == [[0, 1, 2, 3, 4, -1], list(range(6))]
    assert rows.truncated == 1
    unpacked = D.pack(examples, seq_len=6, packing=False)
    assert len(unpacked) == 3 and unpacked.positions[1].tolist() == [0, 1, -1, -1, -1, -1]


def _rows(n, seq_len=4):
    return D.Rows(np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len), np.zeros((n, seq_len), np.int32),
                  np.ones((n, seq_len), np.float32), np.tile(np.arange(seq_len, dtype=np.int32), (n, 1)))


def test_batches_are_a_pure_function_of_the_index():
    rows = _rows(10)
    a, b = D.Batches(rows, 4, seed=3), D.Batches(rows, 4, seed=3)
    order = [a.row_ids(i) for i in range(5)]  # 20 rows: two epochs
    np.testing.assert_array_equal(b.row_ids(3), order[3])  # any index, any instance
    flat = np.concatenate(order)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))  # each epoch a permutation
    assert not np.array_equal(flat[:10], flat[10:])  # reshuffled per epoch
    assert not np.array_equal(D.Batches(rows, 4, seed=4).row_ids(0), order[0])
    np.testing.assert_array_equal(a.micro_batch(1)["tokens"], rows.tokens[order[1]])


def test_each_process_loads_its_slice_of_the_global_batch():
    rows = _rows(16)
    whole = D.Batches(rows, 8, seed=0).row_ids(2)
    parts = [D.Batches(rows, 8, seed=0, process_index=p, process_count=4).row_ids(2) for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    with pytest.raises(ConfigError, match="batch_size=6 must be a multiple of the number of processes"):
        D.Batches(rows, 6, seed=0, process_count=4)


def test_split_and_eval_batches():
    examples = [D.Example(np.arange(i + 3, dtype=np.int32), np.ones(i + 3, bool)) for i in range(10)]
    train, held = D.split_examples(examples, 3, seed=0)
    assert len(train) == 7 and len(held) == 3
    assert {len(e.ids) for e in train} | {len(e.ids) for e in held} == {len(e.ids) for e in examples}
    train2, _ = D.split_examples(examples, 3, seed=0)
    assert [len(e.ids) for e in train2] == [len(e.ids) for e in train]
    batches = D.eval_batches(_rows(5), batch_size=4)
    assert len(batches) == 2 and batches[1]["weights"][1:].sum() == 0 and batches[1]["weights"][0].sum() == 4
    with pytest.raises(ConfigError, match="leaves no training data"):
        D.split_examples(examples, 10, seed=0)


def test_tokenizer_must_fit_the_vocabulary():
    with pytest.raises(ConfigError, match="259 tokens, the model's vocabulary only 100"):
        D.resolve_tokenizer("bytes", None, 100)
    with pytest.raises(ConfigError, match="set data.tokenizer"):
        D.resolve_tokenizer(None, None, 512)
