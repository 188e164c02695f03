"""Raw preference rows -> one shape, `PreferencePair`.

Sources (`load_rows`): a `.jsonl` / `.json` / `.parquet` / `.csv` file, a directory of files of
one of those formats, a `datasets.Dataset` or `DatasetDict`, a list of dicts, or a hub dataset
name (through `datasets.load_dataset`).

Formats (`normalize`), detected once per dataset from its columns and its first row:

- ``standard``: ``prompt``, ``chosen``, ``rejected`` strings.
- ``conversational``: lists of ``{"role", "content"}`` messages; ``chosen`` / ``rejected`` are
  the assistant continuation(s) and ``prompt`` the messages before them. A string prompt is read
  as one user message.
- ``standard_implicit`` / ``conversational_implicit``: no ``prompt`` column. For messages the
  leading messages shared by chosen and rejected are the prompt. For strings the prompt is the
  longest common leading text that ends on a word boundary (`split_common_prefix`); whitespace
  just before the split goes to the responses (``"The sky is"`` + ``" blue."``).

Extra columns are ignored. Every row is validated; a bad row raises `DataError` naming its origin
(``file.jsonl:17``, ``file.csv:5`` (line), ``file.parquet row 3``, ``row 3``) and field, or with
``bad_rows="skip"`` is recorded in `NormalizedData.skipped` with a reason.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "user", "assistant", "tool")
FILE_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_SKIP_HINT = "fix the row, or set bad_rows='skip' to skip bad rows (they are listed in skipped_rows.jsonl)"


class DataError(ValueError):
    """A data problem the user must fix; the message names the file/row/field and what to do."""

    def __init__(self, message: str, *, reason: str = "invalid", origin: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.origin = origin


class RowList(list):
    """Rows read from files: a list of dicts plus each row's origin and the lines skipped while reading."""

    def __init__(self, rows=(), origins=(), skipped=()):
        super().__init__(rows)
        self.origins = list(origins)
        self.skipped = list(skipped)


@dataclass
class PreferencePair:
    """One preference pair in the intermediate shape every format is converted to.

    prompt / chosen / rejected are strings (kind "standard") or lists of messages (kind
    "conversational"); origin says where the row came from; index is its position in
    `NormalizedData.pairs`.
    """

    prompt: str | list
    chosen: str | list
    rejected: str | list
    kind: str
    origin: str
    index: int


@dataclass
class NormalizedData:
    pairs: list[PreferencePair]
    skipped: list[dict] = field(default_factory=list)
    format: str = "standard"


# ----------------------------------------------------------------------------- loading


def load_rows(source, *, split: str | None = None, bad_rows: str = "error", config: str | None = None):
    """Read preference rows from `source`; returns a `datasets.Dataset` or a list of dicts.

    `split` selects the split of a `DatasetDict` or hub dataset (default "train"); it is ignored
    for files, directories and lists. With bad_rows="skip", unreadable JSONL lines are recorded in
    the returned `RowList.skipped` instead of raising. `config` (the config field ``dataset_config``)
    names a configuration of a hub dataset, or of a local dataset folder laid out like one (a
    README.md whose YAML header lists ``configs:``); both are then read by ``datasets.load_dataset(source,
    config, split=split)``. A file or in-memory data has no configurations: a `config` is refused there.
    """
    _check_bad_rows(bad_rows)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return _read_dir(path, bad_rows) if config is None else _load_hub(str(source), split, config)
        if path.is_file():
            _refuse_config(config, f"{path} is a local file")
            return _read_file(path, bad_rows)
        if path.suffix.lower() in FILE_FORMATS:
            raise DataError(f"{path}: no such file; check the path (relative to {Path.cwd()})")
        return _load_hub(str(source), split, config)
    _refuse_config(config, f"the data is a {type(source).__name__} in memory")
    if isinstance(source, (list, tuple)):
        return list(source)
    import datasets

    if isinstance(source, datasets.DatasetDict):
        return _pick_split(source, split, str(type(source).__name__))
    if isinstance(source, datasets.Dataset):
        return source
    raise DataError(
        f"unsupported data source of type {type(source).__name__}: pass a file path, a directory, "
        "a datasets.Dataset / DatasetDict, a list of dicts or a hub dataset name"
    )


def _check_bad_rows(bad_rows: str) -> None:
    if bad_rows not in ("error", "skip"):
        raise ValueError(f"bad_rows={bad_rows!r}: use 'error' (stop at the first bad row) or 'skip'")


def _pick_split(dd, split: str | None, name: str):
    split = split or "train"
    if split not in dd:
        raise DataError(f"{name} has no split {split!r}; its splits are {sorted(dd)}: pick one of them")
    return dd[split]


def _refuse_config(config: str | None, what: str) -> None:
    if config is not None:
        raise DataError(
            f"dataset_config={config!r}: {what}, which has no configurations (they belong to hub datasets and to "
            "dataset folders whose README.md lists `configs:`); unset dataset_config")


def _load_hub(name: str, split: str | None, config: str | None = None):
    import datasets

    try:
        kw = {"name": config} if config is not None else {}
        return datasets.load_dataset(name, split=split or "train", **kw)
    except ValueError as e:
        text = str(e)
        if config is not None and "BuilderConfig" in text:
            raise DataError(f"dataset {name!r} has no configuration dataset_config={config!r} ({text}); set "
                            "dataset_config to one of its configurations") from e
        if config is None and "Config name is missing" in text:
            raise DataError(f"dataset {name!r} has several configurations: set dataset_config to one of them "
                            f"({text})") from e
        if "split" in text.lower():
            raise DataError(f"hub dataset {name!r}: {e}; pass one of its splits") from e
        raise DataError(f"hub dataset {name!r} could not be loaded: {e}") from e
    except Exception as e:  # network, missing dataset, offline mode
        raise DataError(
            f"{name!r} is not a local file or directory, and loading it as a hub dataset failed "
            f"({type(e).__name__}: {e}). Pass a .jsonl/.json/.parquet/.csv file, a directory of them, "
            "or a hub dataset name reachable from this machine"
        ) from e


def _read_dir(path: Path, bad_rows: str) -> RowList:
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    data = [p for p in files if p.suffix.lower() in FILE_FORMATS]
    if not data:
        raise DataError(f"{path}: directory holds no .jsonl/.json/.parquet/.csv file")
    kinds = {FILE_FORMATS[p.suffix.lower()] for p in data}
    if len(kinds) > 1:
        listing = ", ".join(str(p.relative_to(path)) for p in data)
        raise DataError(f"{path}: directory mixes formats {sorted(kinds)} ({listing}); keep files of one format")
    out = RowList()
    for p in data:
        part = _read_file(p, bad_rows)
        out.extend(part)
        out.origins.extend(part.origins)
        out.skipped.extend(part.skipped)
    return out


def _read_file(path: Path, bad_rows: str) -> RowList:
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .parquet or .csv")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty; it must hold preference rows (prompt/chosen/rejected)")
    rows = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "csv": _read_csv}[kind](
        path, bad_rows
    )
    if not rows and not rows.skipped:
        raise DataError(f"{path}: file holds no rows; it must hold preference rows (prompt/chosen/rejected)")
    return rows


def _decode(path: Path, data: bytes, line: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = line if line is not None else data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{at}: not valid UTF-8 (byte 0x{data[e.start]:02x}); re-save the file as UTF-8",
            reason="not_utf8",
            origin=f"{path}:{at}",
        ) from e


def _read_jsonl(path: Path, bad_rows: str) -> RowList:
    out = RowList()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            origin = f"{path}:{lineno}"
            try:
                text = _decode(path, raw, lineno)
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{origin}: invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object",
                        reason="invalid_json",
                    ) from e
                if not isinstance(row, dict):
                    raise DataError(
                        f"{origin}: expected a JSON object per line, got {type(row).__name__}",
                        reason="not_an_object",
                    )
            except DataError as e:
                if bad_rows == "error":
                    raise
                out.skipped.append({"origin": origin, "reason": e.reason, "row": raw.decode("utf-8", "replace")})
                continue
            out.append(row)
            out.origins.append(origin)
    return out


def _read_json(path: Path, bad_rows: str) -> RowList:
    text = _decode(path, path.read_bytes()).lstrip("\ufeff")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line in a .json file
            return _read_jsonl(path, bad_rows)
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})", reason="invalid_json") from e
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if lists and len(lists) == len(data) and len({len(v) for v in lists}) == 1:  # columns
            data = [dict(zip(data, vals)) for vals in zip(*data.values())]
        elif len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):  # {"data": [...]}
            data = lists[0]
        else:
            data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}")
    origins = [f"{path} row {i}" for i in range(len(data))]
    return RowList(data, origins)


def _read_parquet(path: Path, bad_rows: str) -> RowList:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:
        raise DataError(f"{path}: cannot be read as parquet ({e}); check the file is a valid parquet file") from e
    return RowList(rows, [f"{path} row {i}" for i in range(len(rows))])


def _read_csv(path: Path, bad_rows: str) -> RowList:
    text = _decode(path, path.read_bytes()).lstrip("\ufeff")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    out = RowList()
    try:
        for row in reader:
            out.append({k: _csv_cell(v) for k, v in row.items() if k is not None})
            out.origins.append(f"{path}:{reader.line_num}")
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})", reason="invalid_csv") from e
    return out


def _csv_cell(value):
    """CSV cells are text; a cell holding a JSON list of messages is decoded to that list."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(decoded, list) and all(isinstance(m, dict) and "role" in m for m in decoded):
            return decoded
    return value


# ----------------------------------------------------------------------------- normalizing


def normalize(rows, *, origin_name: str | None = None, bad_rows: str = "error") -> NormalizedData:
    """Validate rows and convert them to `PreferencePair`s (see the module docstring for formats).

    origin_name names the dataset in origins ("<origin_name> row 17") for rows that carry no
    file:line origin of their own. Raises `DataError` on the first bad row, or with
    bad_rows="skip" records {origin, reason, row} in `.skipped` and goes on.
    """
    _check_bad_rows(bad_rows)
    if isinstance(rows, Mapping):
        raise DataError(f"{origin_name or 'data'}: got a mapping of splits {sorted(rows)}, not rows; "
                        "pick one split first (load_rows(source, split=...))")
    skipped = list(getattr(rows, "skipped", []))
    origins = getattr(rows, "origins", None)
    if len(rows) == 0 and skipped:  # every line was unreadable
        return NormalizedData(pairs=[], skipped=skipped, format="unknown")
    columns = _columns(rows)
    if "chosen" not in columns or "rejected" not in columns:
        raise DataError(
            f"{origin_name or 'data'}: no 'chosen'/'rejected' columns (found {sorted(columns)}); preference "
            "rows need prompt/chosen/rejected strings, or message lists (prompt optional)"
        )
    kind = "standard"
    for row in rows:
        if isinstance(row, Mapping) and row.get("chosen") is not None:
            kind = "conversational" if isinstance(row["chosen"], (list, tuple)) else "standard"
            break
    implicit = "prompt" not in columns
    pairs: list[PreferencePair] = []
    for i, row in enumerate(rows):
        origin = origins[i] if origins else (f"{origin_name} row {i}" if origin_name else f"row {i}")
        try:
            prompt, chosen, rejected = _convert_row(row, kind, implicit)
        except DataError as e:
            if bad_rows == "error":
                raise DataError(f"{origin}: {e} ({_SKIP_HINT})", reason=e.reason, origin=origin) from None
            skipped.append({"origin": origin, "reason": e.reason, "row": row})
            continue
        pairs.append(PreferencePair(prompt, chosen, rejected, kind, origin, len(pairs)))
    fmt = kind + ("_implicit" if implicit else "")
    return NormalizedData(pairs=pairs, skipped=skipped, format=fmt)


def _columns(rows) -> set[str]:
    names = getattr(rows, "column_names", None)
    if names is not None:
        return set(names)
    if len(rows) == 0 and not getattr(rows, "skipped", None):
        raise DataError("no rows: the dataset is empty")
    return {k for row in rows if isinstance(row, Mapping) for k in row}


def _convert_row(row, kind: str, implicit: bool):
    if not isinstance(row, Mapping):
        raise DataError(f"row is a {type(row).__name__}, expected an object with chosen/rejected", reason="not_an_object")
    fields = ("chosen", "rejected") if implicit else ("prompt", "chosen", "rejected")
    for name in fields:
        if name not in row:
            raise DataError(f"missing field '{name}'", reason="missing_field")
        if row[name] is None:
            raise DataError(f"field '{name}' is null", reason="null_field")
    if kind == "standard":
        for name in fields:
            if isinstance(row[name], (list, tuple)):
                raise DataError(
                    f"field '{name}' is a list but this dataset holds strings (standard format); "
                    "use one format for all rows", reason="mixed_formats")
            if not isinstance(row[name], str):
                raise DataError(f"field '{name}' must be a string, got {type(row[name]).__name__}",
                                reason="non_string_content")
        chosen, rejected = row["chosen"], row["rejected"]
        if chosen == rejected:
            raise DataError("chosen and rejected are identical", reason="identical_responses")
        prompt = row["prompt"] if not implicit else ""
        if implicit:
            prompt, chosen, rejected = split_common_prefix(chosen, rejected)
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise DataError(f"field '{name}' is empty", reason="empty_response")
        return prompt, chosen, rejected
    msgs = {}
    for name in fields:
        value = row[name]
        if name == "prompt" and isinstance(value, str):
            value = [{"role": "user", "content": value}]
        if not isinstance(value, (list, tuple)):
            raise DataError(
                f"field '{name}' is a {type(value).__name__} but this dataset holds message lists "
                "(conversational format); use one format for all rows", reason="mixed_formats")
        msgs[name] = [_check_message(m, name, j) for j, m in enumerate(value)]
    if msgs["chosen"] == msgs["rejected"]:
        raise DataError("chosen and rejected are identical", reason="identical_responses")
    if implicit:
        n = 0
        while n < min(len(msgs["chosen"]), len(msgs["rejected"])) and msgs["chosen"][n] == msgs["rejected"][n]:
            n += 1
        msgs["prompt"] = msgs["chosen"][:n]
        msgs["chosen"], msgs["rejected"] = msgs["chosen"][n:], msgs["rejected"][n:]
    for name in ("chosen", "rejected"):
        completion = msgs[name]
        if not completion:
            raise DataError(f"field '{name}' is empty (no messages after the prompt)", reason="empty_response")
        if not any(m["role"] == "assistant" for m in completion):
            raise DataError(f"field '{name}' has no assistant message in the completion", reason="no_assistant_turn")
        if not any((m.get("content") or "").strip() for m in completion):
            raise DataError(f"field '{name}' is empty (no message content)", reason="empty_response")
    return msgs["prompt"], msgs["chosen"], msgs["rejected"]


def _check_message(message, name: str, j: int) -> dict:
    where = f"field '{name}' message {j}"
    if not isinstance(message, Mapping) or "role" not in message:
        raise DataError(f"{where} must be an object with 'role' and 'content'", reason="bad_message")
    role = message["role"]
    if role not in ROLES:
        raise DataError(f"{where} has unknown role {role!r}; allowed roles are {', '.join(ROLES)}",
                        reason="unknown_role")
    content = message.get("content")
    if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
        raise DataError(f"{where} content must be a string, got {type(content).__name__}",
                        reason="non_string_content")
    # Arrow pads structs with None for keys other rows have; templates test `is defined`, so drop them.
    return {k: v for k, v in message.items() if v is not None or k == "content"}


def _is_boundary(s: str, k: int) -> bool:
    """True if position k of s does not split a word (letters/digits on both sides)."""
    return k == 0 or k >= len(s) or not (s[k - 1].isalnum() and s[k].isalnum())


def split_common_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen_rest, rejected_rest) for the implicit-prompt string format.

    The prompt is the longest common leading text that ends on a word boundary in both strings and
    leaves both responses non-empty; trailing whitespace is moved from the prompt to the responses.
    """
    lcp = 0
    while lcp < min(len(chosen), len(rejected)) and chosen[lcp] == rejected[lcp]:
        lcp += 1
    k = min(lcp, len(chosen) - 1, len(rejected) - 1)
    while k > 0 and not (_is_boundary(chosen, k) and _is_boundary(rejected, k)):
        k -= 1
    k = max(k, 0)
    while k > 0 and chosen[k - 1].isspace():
        k -= 1
    return chosen[:k], chosen[k:], rejected[k:]


# ----------------------------------------------------------------------------- skipped rows


def skipped_summary(skipped: list[dict]) -> str:
    """'3 rows skipped: identical_responses=2, missing_field=1' (counts by reason)."""
    counts = Counter(s["reason"] for s in skipped)
    parts = ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items()))
    return f"{len(skipped)} row{'s' if len(skipped) != 1 else ''} skipped" + (f": {parts}" if parts else "")


def write_skipped(skipped: list[dict], path) -> Path:
    """Write skipped rows as JSONL ({origin, reason, row} per line) to path; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for s in skipped:
            f.write(json.dumps(s, ensure_ascii=False, default=str) + "\n")
    return path
