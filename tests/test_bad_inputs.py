"""A few rows of the bad-input table (tests/bad_inputs_table.py), run by the script's own helper: the
real `age-explorer` in a subprocess answers with one line of error and writes nothing."""

import pytest

from tests import bad_inputs_table as table

# Each row starts `age-explorer`, whose start-up imports torch and diffusers (about 6 CPU-seconds), so five
# rows take about 15 s on two idle cores and more on busy ones: slow, out of the quick loop.
pytestmark = pytest.mark.slow

# rows that need no finished run; the names are the script's
ROWS = ["seed range 0-1000000000", "--iterations 10**12", "ESD target 'zebra 🦓' on the toy model",
        "garbage jobs.sqlite3", "export of a missing run", "empty --candidates file",
        "toyworld train with a concepts.json holding []", "jobs submit-erase --iterations -5",
        "jobs submit-erase of an unknown concept"]


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    work = tmp_path_factory.mktemp("bad-inputs")
    (work / "garbage-jobs").mkdir()
    (work / "garbage-jobs" / "jobs.sqlite3").write_bytes(b"this is not a database" * 100)
    (work / "empty-cands.txt").write_text("\n  \n")
    (work / "empty-list.json").write_text("[]")
    cases = {case.what: case for case in table.cli_cases(hub=f"http://127.0.0.1:{table.unused_port()}")}
    rows = table.run_cli_cases([cases[what] for what in ROWS], work, jobs=2)  # two at a time: each start imports torch
    return dict(zip(ROWS, rows))


@pytest.mark.parametrize("what", ROWS)
def test_bad_cli_input_gets_one_line_and_writes_nothing(observed, what):
    row = observed[what]
    assert row.code == "2", row
    assert row.message.startswith("error: ") and row.one_line == "yes", row
    assert row.checked == "yes", row
