"""Chat data for SFT and DPO: read JSONL (or in-memory lists), validate each record, render it with
the one chat template (`Tokenizer.render_chat`), and count what was rejected and why.

Accepted SFT records: `{"messages": [{"role", "content"}, ...]}` (system/user/assistant, multi-turn,
ending with an assistant turn) or `{"instruction", "input"?, "output", "system"?}`. Accepted DPO
records: `{"prompt": str | messages, "chosen": str | [assistant message], "rejected": ...}`; other
keys (e.g. "lang", "answer") are ignored.

A bad record (invalid JSON, unknown role, empty turn, last turn not the assistant's, chosen equal to
rejected, longer than the context) is either an error naming file:line (`on_bad="error"`) or a
counted skip (`on_bad="skip"`) that the data report lists; nothing is ever truncated.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Union

from geb.errors import GebError
from geb.tokenizer import ROLES

Data = Union[str, Path, Iterable[dict]]
ON_BAD = ("error", "skip")
LABELS = ("kind", "lang")  # optional record fields that evaluation reports break results down by


class BadRecord(Exception):
    """One record that cannot be used: `reason` is a short key for counting, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class DataReport:
    """What happened to each record of one data source; stored in the checkpoint's meta.json."""

    source: str
    records: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first few "source:line: problem"

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < 10:
            self.examples.append(where)

    def to_dict(self) -> dict:
        return {"source": self.source, "records": self.records, "used": self.used,
                "skipped": dict(sorted(self.skipped.items())), "skipped_total": sum(self.skipped.values()),
                "skipped_examples": list(self.examples)}

    def summary(self) -> str:
        s = f"{self.source}: {self.records} records, {self.used} used"
        if self.skipped:
            s += f", {sum(self.skipped.values())} skipped (" + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) + ")"
        return s


# -- reading -----------------------------------------------------------------------------------------
def read_records(data: Data, name: str = "data") -> tuple[list[tuple[int, object]], str, str]:
    """(line number, parsed object or BadRecord) for each record, the source's name, and its hash.

    A path's hash is over its bytes (so it can be checked against the file); a list's is over its
    canonical JSON.
    """
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise GebError(f"{path}: {name} file not found")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GebError(f"{path}: not UTF-8 (byte {e.start})") from None
        out: list[tuple[int, object]] = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                out.append((n, BadRecord("invalid_json", f"not valid JSON ({e.msg} at column {e.colno})")))
        return out, str(path), hashlib.sha256(raw).hexdigest()[:16]
    if isinstance(data, dict):
        raise GebError(f"{name}: expected a path or a list of records, got one dict")
    items = list(data)
    h = hashlib.sha256(json.dumps(items, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:16]
    return [(i + 1, x) for i, x in enumerate(items)], f"<{name}: {len(items)} records>", h


def check_on_bad(on_bad: str) -> None:
    if on_bad not in ON_BAD:
        raise GebError(f"on_bad must be one of {', '.join(ON_BAD)}, got {on_bad!r}")


def _handle(e: BadRecord, source: str, line: int, on_bad: str, report: DataReport) -> None:
    where = f"{source}:{line}: {e}"
    if on_bad == "error":
        raise GebError(f"{where} (pass --on-bad skip / on_bad='skip' to skip and count such records)")
    report.skip(e.reason, where)


# -- validation --------------------------------------------------------------------------------------
def _check_messages(msgs, field_name: str = "messages") -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise BadRecord("bad_format", f"'{field_name}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRecord("bad_format", f"{field_name}[{i}]: expected an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise BadRecord("unknown_role", f"{field_name}[{i}]: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise BadRecord("bad_format", f"{field_name}[{i}]: 'content' must be a string")
        if not content.strip():
            raise BadRecord("empty_turn", f"{field_name}[{i}]: empty {role} turn")
        if role == "system" and i != 0:
            raise BadRecord("bad_format", f"{field_name}[{i}]: a system message may only come first")
        out.append({"role": role, "content": content})
    return out


def conversation(obj) -> list[dict]:
    """An SFT record → validated messages ending with an assistant turn (raises BadRecord)."""
    if not isinstance(obj, dict):
        raise BadRecord("bad_format", "expected a JSON object")
    if "messages" in obj:
        msgs = _check_messages(obj["messages"])
    elif "instruction" in obj or "output" in obj:
        ins, inp, outp = obj.get("instruction"), obj.get("input") or "", obj.get("output")
        for k, v in (("instruction", ins), ("input", inp), ("output", outp)):
            if not isinstance(v, str):
                raise BadRecord("bad_format", f"'{k}' must be a string")
        user = ins.strip() and (ins + ("\n\n" + inp if inp.strip() else ""))
        msgs = ([{"role": "system", "content": obj["system"]}] if obj.get("system") else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": outp}]
        msgs = _check_messages(msgs, "instruction/output")
    else:
        raise BadRecord("bad_format", "expected 'messages' or 'instruction'/'output' fields")
    if msgs[-1]["role"] != "assistant":
        raise BadRecord("last_not_assistant", f"the last turn is the {msgs[-1]['role']}'s, not the assistant's "
                                              "(nothing to learn after it)")
    return msgs


def _response(x, name: str) -> str:
    if isinstance(x, list):  # the conversational form: [{"role": "assistant", "content": ...}]
        if len(x) != 1 or not isinstance(x[0], dict) or x[0].get("role") != "assistant":
            raise BadRecord("bad_format", f"'{name}' as a list must hold exactly one assistant message")
        x = x[0].get("content")
    if not isinstance(x, str):
        raise BadRecord("bad_format", f"'{name}' must be a string (or one assistant message)")
    if not x.strip():
        raise BadRecord("empty_turn", f"'{name}' is empty")
    return x


def preference(obj) -> tuple[list[dict], str, str]:
    """A DPO record → (prompt messages ending with a user turn, chosen text, rejected text)."""
    if not isinstance(obj, dict) or not {"prompt", "chosen", "rejected"} <= set(obj):
        raise BadRecord("bad_format", "expected an object with 'prompt', 'chosen' and 'rejected'")
    p = obj["prompt"]
    if isinstance(p, str):
        if not p.strip():
            raise BadRecord("empty_turn", "'prompt' is empty")
        prompt = [{"role": "user", "content": p}]
    else:
        prompt = _check_messages(p, "prompt")
        if prompt[-1]["role"] != "user":
            raise BadRecord("last_not_user", f"the prompt's last turn is the {prompt[-1]['role']}'s, not the user's")
    chosen, rejected = _response(obj["chosen"], "chosen"), _response(obj["rejected"], "rejected")
    if chosen.strip() == rejected.strip():
        raise BadRecord("identical_pair", "'chosen' and 'rejected' are the same text (no preference to learn)")
    return prompt, chosen, rejected


# -- rendering ---------------------------------------------------------------------------------------
def render_trained(tokenizer, messages: list[dict], train_from: int = 0) -> tuple[list[int], list[int]]:
    """Render messages; return ids up to the final <|im_end|> and the loss mask over them.

    Tokens before `train_from` carry no loss (DPO scores only the final answer). The newline after the
    last <|im_end|> is dropped: it has no loss, and the model stops at <|im_end|>.
    """
    ids, mask = tokenizer.render_chat(messages)
    end = len(ids)
    while end and ids[end - 1] != tokenizer.eos_id:
        end -= 1
    ids, mask = ids[:end], mask[:end]
    if train_from:
        mask = [0] * train_from + mask[train_from:]
    return ids, mask


def _load(data: Data, name: str, on_bad: str, convert, what: str) -> tuple[list, DataReport, str]:
    """(items, report, data hash): every record through `convert`, which raises BadRecord for a bad one
    (handled as `on_bad` says); `what` names the items when none is left."""
    check_on_bad(on_bad)
    recs, source, h = read_records(data, name)
    report = DataReport(source, records=len(recs))
    out = []
    for line, obj in recs:
        try:
            if isinstance(obj, BadRecord):
                raise obj
            item = convert(obj)
        except BadRecord as e:
            _handle(e, source, line, on_bad, report)
            continue
        out.append(item)
    report.used = len(out)
    if not out:
        raise GebError(f"{source}: no usable {what} ({report.summary()})")
    return out, report, h


def load_conversations(data: Data, tokenizer, max_tokens: int, on_bad: str = "error",
                       name: str = "data") -> tuple[list[tuple[list[int], list[int]]], DataReport, str]:
    """SFT data → ([(ids, loss_mask)], report, data hash). Conversations over max_tokens are bad."""

    def convert(obj) -> tuple[list[int], list[int]]:
        ids, mask = render_trained(tokenizer, conversation(obj))
        if len(ids) > max_tokens:
            raise BadRecord("too_long", f"the conversation is {len(ids)} tokens, longer than the "
                                        f"{max_tokens}-token sequence length (it is not truncated)")
        return ids, mask

    return _load(data, name, on_bad, convert, "conversations")


@dataclass
class Pair:
    """One preference pair, rendered: both sequences share the prompt's tokens."""

    chosen: list[int]
    chosen_mask: list[int]
    rejected: list[int]
    rejected_mask: list[int]
    labels: dict = field(default_factory=dict, compare=False)  # the record's "kind"/"lang", for reports


def render_pair(tokenizer, prompt: list[dict], chosen: str, rejected: str) -> Pair:
    p_ids, _ = tokenizer.render_chat(prompt)
    c, cm = render_trained(tokenizer, prompt + [{"role": "assistant", "content": chosen}], len(p_ids))
    r, rm = render_trained(tokenizer, prompt + [{"role": "assistant", "content": rejected}], len(p_ids))
    if c == r:  # different strings can still tokenize identically only if they are identical; be safe
        raise BadRecord("identical_pair", "'chosen' and 'rejected' render to the same tokens")
    return Pair(c, cm, r, rm)


def load_pairs(data: Data, tokenizer, max_tokens: int, on_bad: str = "error",
               name: str = "data") -> tuple[list[Pair], DataReport, str]:
    """DPO data → ([Pair], report, data hash). A pair whose longer side exceeds max_tokens is bad."""

    def convert(obj) -> Pair:
        pair = render_pair(tokenizer, *preference(obj))
        pair.labels = {k: obj[k] for k in LABELS if isinstance(obj.get(k), str)}
        n = max(len(pair.chosen), len(pair.rejected))
        if n > max_tokens:
            raise BadRecord("too_long", f"prompt + answer is {n} tokens, longer than the {max_tokens}-token "
                                        "limit (it is not truncated)")
        return pair

    return _load(data, name, on_bad, convert, "preference pairs")


def load_train_val(loader, data: Data, val_data: Data | None, val_fraction: float, seed: int, log, *args):
    """Train and validation records through `loader` (load_conversations or load_pairs): from
    `val_data` when given, else a seeded `val_fraction` held out of `data`.
    Returns (train, val, reports, data_hash, val_hash); the reports are logged as they come."""
    train, report, data_hash = loader(data, *args, "data")
    log(report.summary())
    reports = {"train": report.to_dict()}
    val_hash = None
    if val_data is not None:
        val, vrep, val_hash = loader(val_data, *args, "val-data")
        log(vrep.summary())
        reports["val"] = vrep.to_dict()
    else:
        tr, va = split_holdout(len(train), val_fraction, seed)
        val, train = [train[i] for i in va], [train[i] for i in tr]
    return train, val, reports, data_hash, val_hash


def check_resumed_data(out_dir, old_meta: dict, data_hash: str, val_hash: str | None) -> None:
    """A resumed SFT/DPO run must read the data it started on (the hashes in its meta.json)."""
    if data_hash != old_meta.get("data_hash") or val_hash != old_meta.get("val_data_hash"):
        raise GebError(f"{out_dir}: the data differ from the run being resumed (hash {data_hash} vs "
                       f"{old_meta.get('data_hash')}); resume with the same files")


def data_label(data: Data | None) -> str | None:
    """How meta.json names the data a stage read: the path, or "<records>" for records given in memory."""
    if data is None:
        return None
    return str(data) if isinstance(data, (str, Path)) else "<records>"


def split_holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, validation) with a seeded `fraction` held out (at least one when fraction > 0)."""
    import random

    if not 0 <= fraction < 1:
        raise GebError(f"validation fraction must be in [0, 1), got {fraction}")
    idx = list(range(n))
    k = 0 if fraction == 0 else max(1, round(n * fraction))
    if k >= n:
        raise GebError(f"cannot hold out {k} of {n} records for validation")
    random.Random(seed).shuffle(idx)
    return sorted(idx[k:]), sorted(idx[:k])


__all__ = ["BadRecord", "DataReport", "Pair", "read_records", "conversation", "preference", "render_trained",
           "render_pair", "load_conversations", "load_pairs", "split_holdout", "ON_BAD"]
