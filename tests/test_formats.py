"""Loading and normalizing preference rows: every format from every source, and hostile inputs."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preftune.data.formats import (
    DataError,
    load_rows,
    normalize,
    skipped_summary,
    split_common_prefix,
    write_skipped,
)


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


SYS = {"role": "system", "content": "Be brief."}

# Each format: (rows, expected (prompt, chosen, rejected) per row, expected format name).
FORMATS = {
    "standard": (
        [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "extra": 1},
         {"prompt": "2+2=", "chosen": "4", "rejected": "5", "extra": 2}],
        [("The sky is", " blue.", " green."), ("2+2=", "4", "5")],
        "standard",
    ),
    "conversational": (
        [{"prompt": [SYS, user("Hi")], "chosen": [bot("Hello.")], "rejected": [bot("Go away.")]},
         {"prompt": [user("2+2?")], "chosen": [bot("4")], "rejected": [bot("5")]}],
        [([SYS, user("Hi")], [bot("Hello.")], [bot("Go away.")]), ([user("2+2?")], [bot("4")], [bot("5")])],
        "conversational",
    ),
    "implicit_string": (
        [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
         {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}],
        [("The sky is", " blue.", " green."), ("Q: 2+2? A:", " 4", " 5")],
        "standard_implicit",
    ),
    "implicit_messages": (
        [{"chosen": [user("Hi"), bot("Hello.")], "rejected": [user("Hi"), bot("Go away.")]},
         {"chosen": [user("a"), bot("b"), user("c"), bot("d")], "rejected": [user("a"), bot("b"), user("c"), bot("e")]}],
        [([user("Hi")], [bot("Hello.")], [bot("Go away.")]),
         ([user("a"), bot("b"), user("c")], [bot("d")], [bot("e")])],
        "conversational_implicit",
    ),
}


def write_rows(path, rows, kind):
    """Write rows as one file of the given type; messages in CSV cells are JSON text."""
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "csv":
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return path


def triples(norm):
    return [(p.prompt, p.chosen, p.rejected) for p in norm.pairs]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "dir"])
def test_each_format_from_each_file_type(tmp_path, fmt, kind):
    rows, expected, name = FORMATS[fmt]
    if kind == "dir":  # two files of one format, read in name order
        write_rows(tmp_path / "a.jsonl", rows[:1], "jsonl")
        write_rows(tmp_path / "b.jsonl", rows[1:], "jsonl")
        (tmp_path / "README.md").write_text("not data")
        source = tmp_path
    else:
        source = write_rows(tmp_path / f"data.{kind}", rows, kind)
    norm = normalize(load_rows(source), origin_name="data")
    assert triples(norm) == expected
    assert norm.format == name and not norm.skipped
    assert [p.index for p in norm.pairs] == [0, 1]
    assert all(p.kind == name.split("_")[0] for p in norm.pairs)


def test_origins_name_file_and_line(tmp_path):
    rows = FORMATS["standard"][0]
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert [p.origin for p in normalize(load_rows(path)).pairs] == [f"{path}:2", f"{path}:4"]
    csv_path = write_rows(tmp_path / "d.csv", rows, "csv")
    assert [p.origin for p in normalize(load_rows(csv_path)).pairs] == [f"{csv_path}:2", f"{csv_path}:3"]
    assert [p.origin for p in normalize(rows, origin_name="mine").pairs] == ["mine row 0", "mine row 1"]
    assert normalize(rows).pairs[1].origin == "row 1"


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_dataset_and_datasetdict(fmt):
    import datasets

    rows, expected, name = FORMATS[fmt]
    ds = datasets.Dataset.from_list(rows)
    assert triples(normalize(load_rows(ds))) == expected
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]), "test": ds})
    assert triples(normalize(load_rows(dd, split="test"))) == expected
    assert triples(normalize(load_rows(dd))) == expected[:1]  # default split "train"
    with pytest.raises(DataError, match=r"no split 'dev'.*\['test', 'train'\]"):
        load_rows(dd, split="dev")
    with pytest.raises(DataError, match="mapping of splits"):
        normalize(dd)


def test_arrow_padding_keys_are_dropped_from_messages():
    import datasets

    rows = [{"prompt": [{"role": "user", "content": "a", "name": "bob"}], "chosen": [bot("b")], "rejected": [bot("c")]},
            {"prompt": [user("x")], "chosen": [bot("y")], "rejected": [bot("z")]}]
    pairs = normalize(load_rows(datasets.Dataset.from_list(rows))).pairs
    assert pairs[0].prompt == [{"role": "user", "content": "a", "name": "bob"}]
    assert pairs[1].prompt == [user("x")]  # no "name": None


def test_hub_name_goes_through_load_dataset(tmp_path, monkeypatch):
    import datasets

    rows, expected, _ = FORMATS["conversational"]
    train = write_rows(tmp_path / "train.jsonl", rows, "jsonl")
    test = write_rows(tmp_path / "test.jsonl", rows[:1], "jsonl")
    real, calls = datasets.load_dataset, []

    def fake_hub(name, split=None, **kw):  # the hub, served from local files
        calls.append((name, split))
        return real("json", data_files={"train": str(train), "test": str(test)}, split=split,
                    cache_dir=str(tmp_path / "cache"))

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    assert triples(normalize(load_rows("someone/prefs"))) == expected
    assert triples(normalize(load_rows("someone/prefs", split="test"))) == expected[:1]
    assert calls == [("someone/prefs", "train"), ("someone/prefs", "test")]
    with pytest.raises(DataError, match="someone/prefs.*split"):
        load_rows("someone/prefs", split="nope")

    def offline(name, split=None, **kw):
        raise FileNotFoundError(f"Couldn't find dataset {name} on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="not a local file or directory.*FileNotFoundError"):
        load_rows("nobody/nothing")


# ----------------------------------------------------------------------------- hostile files


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(FORMATS["standard"][0][0])
    path.write_text(f"{good}\n{{\"prompt\": \"x\", \n{good}\n")
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON .*column"):
        load_rows(path)
    rows = load_rows(path, bad_rows="skip")
    norm = normalize(rows, bad_rows="skip")
    assert len(norm.pairs) == 2
    assert [(s["origin"], s["reason"]) for s in norm.skipped] == [(f"{path}:2", "invalid_json")]


def test_non_object_line_and_non_utf8(tmp_path):
    path = tmp_path / "arr.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=rf"{path}:1: expected a JSON object"):
        load_rows(path)
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=rf"{path}:3: not valid UTF-8 \(byte 0xe9\).*re-save"):
        load_rows(path)
    assert [s["reason"] for s in load_rows(path, bad_rows="skip").skipped] == ["not_utf8"]
    csv_path = tmp_path / "latin1.csv"
    csv_path.write_bytes(b"prompt,chosen,rejected\np,a,b\ncaf\xe9,a,b\n")
    with pytest.raises(DataError, match=rf"{csv_path}:3: not valid UTF-8"):
        load_rows(csv_path)


def test_empty_files_and_directories(tmp_path):
    for name in ("e.jsonl", "e.json", "e.csv", "e.parquet"):
        (tmp_path / name).write_text("")
        with pytest.raises(DataError, match=rf"{name}: file is empty"):
            load_rows(tmp_path / name)
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="holds no rows"):
        load_rows(tmp_path / "blank.jsonl")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="holds no .jsonl"):
        load_rows(tmp_path / "empty_dir")
    with pytest.raises(DataError, match="no such file"):
        load_rows(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="empty"):
        normalize([])


def test_mixed_format_directory_names_the_files(tmp_path):
    rows = FORMATS["standard"][0]
    write_rows(tmp_path / "a.jsonl", rows, "jsonl")
    write_rows(tmp_path / "b.csv", rows, "csv")
    with pytest.raises(DataError, match=r"mixes formats \['csv', 'jsonl'\] \(a.jsonl, b.csv\)"):
        load_rows(tmp_path)


def test_no_chosen_column():
    with pytest.raises(DataError, match=r"no 'chosen'/'rejected' columns \(found \['answer', 'question'\]\)"):
        normalize([{"question": "q", "answer": "a"}])


# (row, reason, text the message must contain). The dataset's first row fixes its format.
BAD_ROWS = [
    ({"prompt": "p", "chosen": "a"}, "missing_field", "missing field 'rejected'"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "null_field", "field 'prompt' is null"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "non_string_content", "field 'chosen' must be a string, got int"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "empty_response", "field 'chosen' is empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical_responses", "identical"),
    ({"prompt": "p", "chosen": [bot("a")], "rejected": "b"}, "mixed_formats", "field 'chosen' is a list"),
]
BAD_MESSAGE_ROWS = [
    ({"prompt": [user("p")], "chosen": [bot(7)], "rejected": [bot("b")]}, "non_string_content",
     "field 'chosen' message 0 content must be a string, got int"),
    ({"prompt": [user("p")], "chosen": [{"role": "wizard", "content": "a"}], "rejected": [bot("b")]},
     "unknown_role", "unknown role 'wizard'; allowed roles are system, user, assistant, tool"),
    ({"prompt": [user("p")], "chosen": [user("a")], "rejected": [bot("b")]}, "no_assistant_turn",
     "field 'chosen' has no assistant message"),
    ({"prompt": [user("p")], "chosen": [bot("a")], "rejected": [bot("")]}, "empty_response", "'rejected' is empty"),
    ({"prompt": [user("p")], "chosen": [bot("a")], "rejected": [bot("a")]}, "identical_responses", "identical"),
    ({"prompt": [user("p")], "chosen": ["a"], "rejected": [bot("b")]}, "bad_message", "message 0 must be an object"),
    ({"prompt": [user("p")], "chosen": "a", "rejected": [bot("b")]}, "mixed_formats", "holds message lists"),
]


@pytest.mark.parametrize("bad,reason,text", BAD_ROWS + BAD_MESSAGE_ROWS)
def test_bad_row_raises_with_origin_and_field(tmp_path, bad, reason, text):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    if isinstance(bad.get("rejected"), list):
        good = {"prompt": [user("p")], "chosen": [bot("a")], "rejected": [bot("b")]}
    path = write_rows(tmp_path / "rows.jsonl", [good, bad], "jsonl")
    with pytest.raises(DataError) as err:
        normalize(load_rows(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}:2: ") and text in msg and "bad_rows='skip'" in msg
    assert err.value.reason == reason
    norm = normalize(load_rows(path), bad_rows="skip")
    assert len(norm.pairs) == 1 and norm.skipped == [{"origin": f"{path}:2", "reason": reason, "row": bad}]


def test_implicit_messages_without_assistant_completion():
    rows = [{"chosen": [user("a"), bot("b")], "rejected": [user("a"), user("more")]}]
    with pytest.raises(DataError, match="'rejected' has no assistant message"):
        normalize(rows)
    rows = [{"chosen": [user("a"), bot("b")], "rejected": [user("a"), bot("b"), user("more")]}]
    with pytest.raises(DataError, match="'chosen' is empty .no messages after the prompt"):
        normalize(rows)


def test_conversational_string_prompt_is_a_user_message():
    pair = normalize([{"prompt": "Hi", "chosen": [bot("a")], "rejected": [bot("b")]}]).pairs[0]
    assert pair.prompt == [user("Hi")] and pair.kind == "conversational"


def test_skip_counts_by_reason_and_writes_jsonl(tmp_path):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    rows = [good] + [bad for bad, _, _ in BAD_ROWS] + [good, BAD_ROWS[0][0]]
    norm = normalize(rows, origin_name="x", bad_rows="skip")
    assert len(norm.pairs) == 2 and [p.index for p in norm.pairs] == [0, 1]
    expected = Counter(reason for _, reason, _ in BAD_ROWS) + Counter({"missing_field": 1})
    assert Counter(s["reason"] for s in norm.skipped) == expected
    summary = skipped_summary(norm.skipped)
    assert summary.startswith(f"{sum(expected.values())} rows skipped: ")
    assert "missing_field=2" in summary and "identical_responses=1" in summary
    out = write_skipped(norm.skipped, tmp_path / "run" / "skipped_rows.jsonl")
    back = [json.loads(line) for line in out.read_text().splitlines()]
    assert back == [{**s, "row": s["row"]} for s in norm.skipped]
    assert back[0]["origin"] == "x row 1"


def test_skip_when_every_line_is_unreadable(tmp_path):
    path = tmp_path / "junk.jsonl"
    path.write_text("nope\n{]\n")
    norm = normalize(load_rows(path, bad_rows="skip"), bad_rows="skip")
    assert norm.pairs == [] and [s["reason"] for s in norm.skipped] == ["invalid_json", "invalid_json"]


def test_bad_rows_option_is_checked():
    with pytest.raises(ValueError, match="bad_rows='drop'"):
        normalize([], bad_rows="drop")


def test_million_character_row_loads(tmp_path):
    big = "x" * 1_000_000
    path = write_rows(tmp_path / "big.jsonl", [{"prompt": "p", "chosen": big, "rejected": "short"}], "jsonl")
    pair = normalize(load_rows(path)).pairs[0]
    assert len(pair.chosen) == 1_000_000


# ----------------------------------------------------------------------------- implicit string prompts


@pytest.mark.parametrize("chosen,rejected,expected", [
    ("The sky is blue.", "The sky is green.", ("The sky is", " blue.", " green.")),
    ("2+2=4", "2+2=5", ("2+2=", "4", "5")),
    ("four", "for", ("", "four", "for")),  # never split inside a word
    ("A: 4", "A: 4 because", ("A:", " 4", " 4 because")),  # both responses stay non-empty
    ("a", "b", ("", "a", "b")),
])
def test_split_common_prefix_examples(chosen, rejected, expected):
    assert split_common_prefix(chosen, rejected) == expected


def slow_split(c: str, r: str):
    """The definition, by brute force: the longest k with a shared prefix, on a word boundary in
    both strings, leaving both responses non-empty; then trailing whitespace moves to the responses."""
    def boundary(s, k):
        return k == 0 or k == len(s) or not (s[k - 1].isalnum() and s[k].isalnum())

    ks = [k for k in range(0, min(len(c), len(r))) if c[:k] == r[:k] and boundary(c, k) and boundary(r, k)]
    k = max(ks, default=0)
    k = len(c[:k].rstrip())
    return c[:k], c[k:], r[k:]


@settings(max_examples=300, deadline=None)
@given(st.text("ab 1.", min_size=1, max_size=12), st.text("ab 1.", min_size=1, max_size=12))
def test_split_common_prefix_matches_brute_force(c, r):
    got = split_common_prefix(c, r)
    assert got == slow_split(c, r)
    assert got[0] + got[1] == c and got[0] + got[2] == r


# ----------------------------------------------------------------------------- dataset_config


def dataset_folder(root):
    """A local dataset laid out like a hub repository with two configurations (README.md `configs:`)."""
    files = {"en/train.jsonl": [("hi", "good", "bad"), ("yo", "fine", "worse")],
             "fr/train.jsonl": [("salut", "bon", "mauvais")],
             "fr/test.jsonl": [("test", "oui", "non")]}
    for name, triples_ in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_rows(root / name, [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in triples_], "jsonl")
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: en\n  data_files:\n  - split: train\n    path: en/train.jsonl\n"
        "- config_name: fr\n  data_files:\n  - split: train\n    path: fr/train.jsonl\n"
        "  - split: test\n    path: fr/test.jsonl\n---\n")
    return root


@pytest.fixture
def local_datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_dataset_config_picks_a_configuration_of_a_dataset_folder(tmp_path, local_datasets_cache):
    folder = dataset_folder(tmp_path / "prefs")
    assert triples(normalize(load_rows(folder, config="en"))) == [("hi", "good", "bad"), ("yo", "fine", "worse")]
    assert triples(normalize(load_rows(str(folder), config="fr"))) == [("salut", "bon", "mauvais")]
    assert triples(normalize(load_rows(folder, config="fr", split="test"))) == [("test", "oui", "non")]
    with pytest.raises(DataError, match="no configuration dataset_config='de'.*'en', 'fr'"):
        load_rows(folder, config="de")


def test_dataset_config_reaches_load_dataset_for_a_hub_name(monkeypatch):
    import datasets

    calls = []

    def fake_hub(path, split=None, **kw):
        calls.append((path, split, kw))
        return datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    load_rows("someone/prefs", config="en")
    load_rows("someone/prefs")
    assert calls == [("someone/prefs", "train", {"name": "en"}), ("someone/prefs", "train", {})]


def test_dataset_config_is_refused_where_there_are_no_configurations(tmp_path):
    rows = FORMATS["standard"][0]
    path = write_rows(tmp_path / "d.jsonl", rows, "jsonl")
    with pytest.raises(DataError, match=f"dataset_config='en': {path} is a local file.*unset dataset_config"):
        load_rows(path, config="en")
    with pytest.raises(DataError, match="dataset_config='en': the data is a list in memory"):
        load_rows(rows, config="en")
    import datasets

    with pytest.raises(DataError, match="dataset_config='en': the data is a Dataset in memory"):
        load_rows(datasets.Dataset.from_list(rows), config="en")
