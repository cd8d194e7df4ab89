"""Data pipeline settings: every rule's on/off default and parameters, resolved from user overrides.

A rule is named in one namespace whatever it does (clean, quality, dedup). Overrides come as a dict
`{"pii": {"mode": "remove"}, "t2s": {"enabled": true}}` (from a JSON file) or as CLI strings
`pii.mode=remove`, `t2s=on`; values are parsed as JSON where they parse, else kept as strings.
"""

from __future__ import annotations

import copy
import json

from geb.errors import GebError

READ_DEFAULTS = {"text_key": "text", "id_key": "id", "txt_mode": "paragraph", "max_doc_chars": 1_000_000,
                 "huge_docs": "split"}

DEDUP_RULES = {
    "minhash": (True, "near-duplicate documents: MinHash LSH over character 4-grams (unit=chars: Chinese and English "
                      "alike; unit=words shingles English by words), 80 bands × 10 hashes (datatrove; Jaccard ≈ 0.65 "
                      "has a 50% catch chance); chosen on bench/near_dup.py's labelled zh/en set (recall 0.98, "
                      "precision 0.99); index_dir: a folder of earlier runs' indexes to dedup against (and add this run to)",
                {"unit": "chars", "n_grams": 4, "num_buckets": 80, "hashes_per_bucket": 10, "seed": 1, "index_dir": "",
                 "index_name": ""}),
    "para_dedup": (True, "exact paragraph dedup across and inside documents: a paragraph (line) seen earlier is "
                         "dropped when it has ≥ min_units units (datatrove sentence dedup over lines)",
                   {"min_units": 10}),
    "sent_dedup": (True, "exact consecutive-sentence dedup across documents: any span of n_sentences sentences seen "
                         "earlier is dropped (C4/datatrove; Chinese and English sentence ends)",
                   {"n_sentences": 3, "min_units": 0}),
}


def rule_classes() -> dict:
    from geb.data.quality import QUALITY_FILTERS
    from geb.data.rules import CLEAN_RULES

    return {c.rule: c for c in [*CLEAN_RULES, *QUALITY_FILTERS]}


def default_settings() -> dict:
    rules = {}
    for name, cls in rule_classes().items():
        rules[name] = {"enabled": cls.enabled_by_default, **copy.deepcopy(cls.defaults)}
    for name, (on, _, params) in DEDUP_RULES.items():
        rules[name] = {"enabled": on, **copy.deepcopy(params)}
    return {"read": dict(READ_DEFAULTS), "rules": rules, "val_fraction": 0.01, "seed": 0}


def rule_table() -> list[dict]:
    """One row per rule: name, stage, default on/off, defaults, what it does (for `geb data rules`, docs)."""
    rows = []
    for name, cls in rule_classes().items():
        rows.append({"rule": name, "stage": cls.stage, "enabled": cls.enabled_by_default,
                     "defaults": cls.defaults, "help": cls.help})
    for name, (on, help_, params) in DEDUP_RULES.items():
        rows.append({"rule": name, "stage": "dedup", "enabled": on, "defaults": params, "help": help_})
    return rows


def _parse_value(v: str):
    low = v.strip().lower()
    if low in ("on", "true", "yes"):
        return True
    if low in ("off", "false", "no"):
        return False
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def parse_overrides(items: list[str]) -> dict:
    """['pii.mode=remove', 't2s=on', 'read.txt_mode=line', 'val_fraction=0.05'] → nested dict."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise GebError(f"setting {item!r}: expected NAME=VALUE (e.g. pii.mode=remove or t2s=on)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        val = _parse_value(value)
        if parts[0] == "read" or parts[0] in ("val_fraction", "seed"):
            node = out
        else:
            node = out.setdefault("rules", {})
            if len(parts) == 1:  # "t2s=on"
                parts = [parts[0], "enabled"]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = val
    return out


def resolve(overrides: dict | None = None) -> dict:
    """Defaults updated with overrides, checking every name so a typo is an error, not a silent no-op."""
    s = default_settings()
    for key, val in (overrides or {}).items():
        if key == "read":
            for k, v in val.items():
                if k not in s["read"]:
                    raise GebError(f"unknown read setting {k!r} (known: {', '.join(s['read'])})")
                s["read"][k] = v
        elif key == "rules":
            for rule, params in val.items():
                if rule not in s["rules"]:
                    raise GebError(f"unknown rule {rule!r} (known: {', '.join(s['rules'])})")
                if isinstance(params, bool):
                    params = {"enabled": params}
                for k, v in params.items():
                    if k not in s["rules"][rule]:
                        raise GebError(f"rule {rule!r} has no setting {k!r} (known: {', '.join(s['rules'][rule])})")
                    s["rules"][rule][k] = v
        elif key in ("val_fraction", "seed"):
            s[key] = val
        else:
            raise GebError(f"unknown setting {key!r} (known: read, rules, val_fraction, seed)")
    r = s["read"]
    if r["txt_mode"] not in ("paragraph", "line", "file"):
        raise GebError(f"read.txt_mode must be paragraph, line or file (got {r['txt_mode']!r})")
    if r["huge_docs"] not in ("split", "drop"):
        raise GebError(f"read.huge_docs must be split or drop (got {r['huge_docs']!r})")
    if not 0 <= float(s["val_fraction"]) < 1:
        raise GebError(f"val_fraction must be in [0, 1) (got {s['val_fraction']})")
    return s
