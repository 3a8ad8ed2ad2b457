"""Prompt datasets: file errors name file/line/field, length dropping, chat templates, images, the resumable
mixture sampler, the synthetic task and the tiny tokenizer."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest

from megatron_sapo.data import (
    BOS_ID,
    EOS_ID,
    DataError,
    MixtureSampler,
    build_prompt_source,
    build_tiny_tokenizer,
    load_prompt_file,
    make_synthetic_rows,
    make_tiny_tokenizer,
    render_prompt,
    write_jsonl,
)
from megatron_sapo.rewards import compute_reward


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def _jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


ROW = json.dumps({"prompt": "copy:12=", "answer": "12", "task": "copy"})


# ---- files ---------------------------------------------------------------------------------------------
def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [ROW, "", ROW, '{"prompt": "copy:1=", "answer": '])
    with pytest.raises(DataError, match=r"bad\.jsonl, line 4: not valid JSON"):
        load_prompt_file(path)
    path = _jsonl(tmp_path / "list.jsonl", [ROW, "[1, 2]"])
    with pytest.raises(DataError, match=r"list\.jsonl, line 2: expected a JSON object, got list"):
        load_prompt_file(path)


def test_missing_fields_name_file_line_and_field(tmp_path):
    rows = [ROW, json.dumps({"prompt": "copy:3=", "task": "copy"})]
    with pytest.raises(DataError, match=r"m\.jsonl, line 2: missing field 'answer' \(needed by task 'copy'\)"):
        load_prompt_file(_jsonl(tmp_path / "m.jsonl", rows))
    rows = [json.dumps({"question": "x", "answer": "1", "task": "math"})]
    with pytest.raises(DataError, match=r"q\.jsonl, line 1: missing field 'prompt'.*it has: question, answer, task$"):
        load_prompt_file(_jsonl(tmp_path / "q.jsonl", rows))
    rows = [json.dumps({"prompt": "x", "answer": "1"})]
    with pytest.raises(DataError, match=r"t\.jsonl, line 1: missing field 'task'"):
        load_prompt_file(_jsonl(tmp_path / "t.jsonl", rows))
    assert load_prompt_file(str(tmp_path / "t.jsonl"), default_task="math")[0]["task"] == "math"
    rows = [json.dumps({"prompt": "x", "tests": [], "task": "cobol"})]
    with pytest.raises(DataError, match=r"line 1: field 'task' is 'cobol', not one of .*code"):
        load_prompt_file(_jsonl(tmp_path / "c.jsonl", rows))
    rows = [json.dumps({"prompt": "  ", "answer": "1", "task": "math"})]
    with pytest.raises(DataError, match="field 'prompt' is empty"):
        load_prompt_file(_jsonl(tmp_path / "e.jsonl", rows))


def test_empty_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match=r"empty\.jsonl: the dataset is empty"):
        load_prompt_file(_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(DataError, match="not found"):
        load_prompt_file(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unknown dataset format; use .*\.parquet.*hf:NAME"):
        load_prompt_file(str(tmp_path / "x.csv"))


def test_parquet_rows_and_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "copy:12=", "answer": "12", "task": "copy"}] * 3), good)
    rows = load_prompt_file(str(good))
    assert len(rows) == 3 and rows[2]["answer"] == "12" and rows[2]["_line"].endswith("row 3")
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "answer": "1", "task": "math"}, {"prompt": "p"}]), bad)
    with pytest.raises(DataError, match=r"bad\.parquet, row 2: missing field 'task'"):
        load_prompt_file(str(bad))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_prompt_file(str(tmp_path / "junk.parquet"))


# ---- prompts -------------------------------------------------------------------------------------------
def test_long_prompts_dropped_and_counted_never_truncated(tmp_path, tok, caplog):
    rows = [ROW, json.dumps({"prompt": "copy:" + "1" * 40 + "=", "answer": "1" * 40, "task": "copy"}), ROW]
    path = _jsonl(tmp_path / "long.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        src = build_prompt_source([path], tok, max_prompt_len=16, seed=0)
    assert src.dropped == [1] and len(src.prompts[0]) == 2
    assert "dropped 1 of 3 prompts longer than max_prompt_len=16" in caplog.text and "line 2" in caplog.text
    assert all(p.text == "copy:12=" and p.ids == [BOS_ID] + tok.encode("copy:12=").ids[1:] for p in src.prompts[0])
    assert src.stats()["data/0/dropped"] == 1.0
    with pytest.raises(DataError, match=r"all 3 prompts are longer than max_prompt_len=4 .*line \d"):
        build_prompt_source([path], tok, max_prompt_len=4, seed=0)


def test_chat_template_applied_when_present_else_raw(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(build_tiny_tokenizer(str(tmp_path / "tok")))
    assert render_prompt(hf, "copy:1=") == ("copy:1=", False)
    with pytest.raises(DataError, match="no chat template"):
        render_prompt(hf, [{"role": "user", "content": "hi"}], where="f.jsonl, line 3")
    hf.chat_template = "{{ bos_token }}{% for m in messages %}{{ m.role }}:{{ m.content }}\n{% endfor %}>"
    text, templated = render_prompt(hf, "copy:1=")
    assert templated and text == "<bos>user:copy:1=\n>"
    path = _jsonl(tmp_path / "c.jsonl", [ROW])
    src = build_prompt_source([path], hf, max_prompt_len=32, seed=0)
    p = src.prompts[0][0]
    assert p.text == "<bos>user:copy:12=\n>" and p.ids.count(BOS_ID) == 1 and p.ids[0] == BOS_ID


def test_images_carried_through(tmp_path, tok):
    rows = [
        json.dumps({"prompt": "a", "answer": "1", "task": "copy", "images": ["img/1.png", "img/2.png"]}),
        json.dumps({"prompt": "b", "answer": "1", "task": "copy", "image": "img/3.png"}),
        json.dumps({"prompt": "c", "answer": "1", "task": "copy"}),
    ]
    src = build_prompt_source([_jsonl(tmp_path / "i.jsonl", rows)], tok, max_prompt_len=8, seed=0)
    by_text = {p.text: p.images for p in src.prompts[0]}
    assert by_text == {"a": ["img/1.png", "img/2.png"], "b": ["img/3.png"], "c": None}
    bad = [json.dumps({"prompt": "a", "answer": "1", "task": "copy", "images": "x.png"})]
    with pytest.raises(DataError, match="line 1: field 'images' must be a list"):
        load_prompt_file(_jsonl(tmp_path / "b.jsonl", bad))


def test_image_tokens_count_toward_max_prompt_len(tmp_path, tok):
    # "a" is 2 tokens (BOS + a); each image adds data.image_tokens: 2 images x 4 = 10 > 8, one image = 6 <= 8
    rows = [
        json.dumps({"prompt": "a", "answer": "1", "task": "copy", "images": ["1.png", "2.png"]}),
        json.dumps({"prompt": "b", "answer": "1", "task": "copy", "image": "3.png"}),
    ]
    path = _jsonl(tmp_path / "i.jsonl", rows)
    src = build_prompt_source([path], tok, max_prompt_len=8, seed=0, image_tokens=4)
    assert [p.text for p in src.prompts[0]] == ["b"] and src.dropped == [1]
    assert len(build_prompt_source([path], tok, max_prompt_len=8, seed=0).prompts[0]) == 2  # not counted


def test_hf_datasets_saved_folder_and_hf_spec(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    rows = make_synthetic_rows("copy", 6, seed=3)
    saved = str(tmp_path / "saved")
    datasets.Dataset.from_list(rows).save_to_disk(saved)
    src = build_prompt_source([saved], tok, max_prompt_len=32, seed=0)
    assert sorted(p.sample["answer"] for p in src.prompts[0]) == sorted(r["answer"] for r in rows)
    assert src.prompts[0][0].where.startswith(f"{saved}, row ")
    # hf:NAME@SPLIT through datasets.load_dataset: a local folder of JSONL files (no network here)
    folder = tmp_path / "hub_like"
    folder.mkdir()
    write_jsonl(rows, str(folder / "train.jsonl"))
    src = build_prompt_source([f"hf:{folder}@train"], tok, max_prompt_len=32, seed=0)
    assert len(src.prompts[0]) == 6
    with pytest.raises(DataError, match=r"hf:.*@nosuch: datasets could not load it"):
        build_prompt_source([f"hf:{folder}@nosuch"], tok, max_prompt_len=32, seed=0)
    bad = [dict(r, task="no_such_task") for r in rows]
    datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad, row 1: field 'task' is 'no_such_task'"):
        build_prompt_source([str(tmp_path / "bad")], tok, max_prompt_len=32, seed=0)


def test_mixing_weights_across_datasets(tmp_path, tok):
    a = write_jsonl(make_synthetic_rows("copy", 50, seed=1), str(tmp_path / "a.jsonl"))
    b = write_jsonl(make_synthetic_rows("add", 10, seed=2), str(tmp_path / "b.jsonl"))
    src = build_prompt_source([a, b], tok, max_prompt_len=32, seed=3, weights=[0.25, 0.75])
    tasks = Counter(p.task for p in src.sample(2000))
    assert 0.70 < tasks["add"] / 2000 < 0.80
    with pytest.raises(DataError, match="2 weights for 1 paths"):
        build_prompt_source([a], tok, max_prompt_len=32, seed=3, weights=[1, 2])


# ---- sampler -------------------------------------------------------------------------------------------
def test_sampler_deterministic_and_epochs_cover_every_row():
    s1, s2 = MixtureSampler([7], seed=5), MixtureSampler([7], seed=5)
    first = s1.take(14)
    assert first == s2.take(14)
    assert sorted(r for _, r in first[:7]) == list(range(7)) == sorted(r for _, r in first[7:])
    assert [r for _, r in first[:7]] != [r for _, r in first[7:]]  # a new permutation each epoch
    assert MixtureSampler([7], seed=6).take(7) != first[:7]


@pytest.mark.parametrize("cut", [0, 3, 9, 20])
def test_sampler_resume_mid_epoch_continues_identically(cut):
    ref = MixtureSampler([5, 8, 3], weights=[1, 2, 1], seed=11)
    expected = ref.take(40)
    a = MixtureSampler([5, 8, 3], weights=[1, 2, 1], seed=11)
    head = a.take(cut)
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON checkpoint
    b = MixtureSampler([5, 8, 3], weights=[1, 2, 1], seed=11)
    b.load_state_dict(state)
    assert head + b.take(40 - cut) == expected


def test_sampler_state_mismatch_and_bad_arguments():
    state = MixtureSampler([5, 8], seed=1).state_dict()
    with pytest.raises(ValueError, match="sizes"):
        MixtureSampler([5, 9], seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        MixtureSampler([5, 8], seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="weights"):
        MixtureSampler([5, 8], weights=[1, 1], seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset 1 is empty"):
        MixtureSampler([3, 0])
    with pytest.raises(ValueError, match="positive sum"):
        MixtureSampler([3, 3], weights=[0, 0])


def test_prompt_source_resume(tok):
    src = build_prompt_source([], tok, max_prompt_len=32, seed=9)
    src.sample(10)
    state = src.state_dict()
    cont = [p.text for p in src.sample(6)]
    again = build_prompt_source([], tok, max_prompt_len=32, seed=9)
    again.load_state_dict(state)
    assert [p.text for p in again.sample(6)] == cont
    other = build_prompt_source([], tok, max_prompt_len=32, seed=9, synthetic_task="add")
    with pytest.raises(ValueError, match="prompt source mismatch"):
        other.load_state_dict(state)


# ---- synthetic task and tokenizer ----------------------------------------------------------------------
def test_synthetic_rows_deterministic_and_verifiable():
    rows = make_synthetic_rows("mix", 30, seed=4)
    assert rows == make_synthetic_rows("mix", 30, seed=4) and rows != make_synthetic_rows("mix", 30, seed=5)
    assert {r["task"] for r in rows} == {"copy", "reverse", "add"}
    for r in rows:
        assert compute_reward(r["task"], r["answer"], r) == 1.0
        body = r["prompt"].split(":", 1)[1].rstrip("=")
        expect = {"copy": body, "reverse": body[::-1], "add": str(sum(map(int, body.split("+"))))}[r["task"]]
        assert r["answer"] == expect
    with pytest.raises(ValueError, match="valid: copy, reverse, add"):
        make_synthetic_rows("sort", 3)


def test_tiny_tokenizer_round_trip_and_hf_folder(tmp_path, tok):
    assert tok.get_vocab_size() == 64
    enc = tok.encode("add:12+7=\n19")
    assert enc.ids[0] == BOS_ID and len(enc.ids) == 1 + len("add:12+7=\n19")
    assert tok.decode(enc.ids) == "add:12+7=\n19"
    assert tok.decode([*enc.ids, EOS_ID, 60]) == "add:12+7=\n19"  # specials and reserved skipped
    path = build_tiny_tokenizer(str(tmp_path / "tok"))
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<bos>" and cfg["eos_token"] == "<eos>" and cfg["pad_token"] == "<pad>"
    first = (tmp_path / "tok" / "tokenizer.json").read_bytes()
    build_tiny_tokenizer(path)
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == first
    with pytest.raises(ValueError, match="below the 53 tokens"):
        make_tiny_tokenizer(32)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert len(hf) == 64 and (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (BOS_ID, EOS_ID, 0)
    assert hf("copy:12=")["input_ids"] == tok.encode("copy:12=").ids
    assert hf.decode([*hf("copy:12=")["input_ids"], EOS_ID], skip_special_tokens=True) == "copy:12="
