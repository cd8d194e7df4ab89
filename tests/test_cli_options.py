"""Every `geb` subcommand still declares the options it declared when tests/data/cli_options.json was written
(flags, defaults, types, choices, required), in any order. After a deliberate CLI change, regenerate the
snapshot with `python -m tests.cli_options` and review its diff."""

from __future__ import annotations

import json

from tests.cli_options import SNAPSHOT, current_options


def test_every_subcommand_keeps_its_options_and_defaults():
    recorded = json.loads(SNAPSHOT.read_text())
    now = json.loads(json.dumps(current_options()))  # tuples → lists, as the snapshot holds them
    assert sorted(now) == sorted(recorded), "subcommands added or removed"
    for name in recorded:
        want = {json.dumps(o, sort_keys=True) for o in recorded[name]}
        got = {json.dumps(o, sort_keys=True) for o in now[name]}
        assert got == want, (f"geb {name}: options changed\n  missing: {sorted(want - got)}\n"
                             f"  new: {sorted(got - want)}")


def test_the_snapshot_covers_the_training_flags():
    # the guard is only as good as its coverage: the commands issue 17 regenerates must be in it
    recorded = json.loads(SNAPSHOT.read_text())
    flags = {f for o in recorded["pretrain"] for f in o["flags"]}
    assert {"--lr", "--batch-size", "--out"} <= flags
    assert any("--lr" in o["flags"] for o in recorded["sft"])
