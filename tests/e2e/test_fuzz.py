"""Fuzz: a few hundred malformed checkpoints, ONNX files, data files, recipes and CLI values (tests/fuzz_cases.py)
through the CLI in-process: exit 0 or 2 (exactly 2 where the input is wrong), never 3, no traceback, no raw
control character from a file on the terminal, no code run from a file, inputs never modified. Also latency
tables and FIFOs given as inputs or outputs."""
import hashlib
import json

import fuzz_cases as fz
import pytest


class Outcomes(dict):
    """{case id: result}; a short repr, as pytest prints fixture values with each failure."""

    def __repr__(self):
        return f"<{len(self)} fuzz outcomes>"


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    return folder, Outcomes(fz.run_all(folder))


def test_case_table_covers_every_kind():
    counts = {kind: sum(c.kind == kind for c in fz.CASES) for kind in ("ckpt", "onnx", "data", "recipe", "table", "cli")}
    assert min(counts.values()) >= 20 and sum(counts.values()) == len(fz.CASES) >= 300, counts
    assert len({c.id for c in fz.CASES}) == len(fz.CASES)


@pytest.mark.parametrize("case", fz.CASES, ids=[c.id for c in fz.CASES])
def test_malformed_input(fuzzed, case):
    _, results = fuzzed
    result = results.get(case.id)
    if result and "skipped" in result:
        pytest.skip(result["skipped"])
    why = fz.problem(case, result)
    assert why is None, f"edgec {' '.join(case.argv)}: {why}"


def test_no_code_ran_and_inputs_untouched(fuzzed):
    folder, results = fuzzed
    assert not (folder / "PWNED").exists(), "a hostile pickle ran its code"
    hashes = json.loads((folder / "base-hashes.json").read_text())
    assert set(hashes) == {"r.pt", "t.pt", "c.pt", "m.onnx", "d.npz"}
    for name, digest in hashes.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, f"{name} was modified"
    for fifo in ("fifo", "recipes/fifo", "fifo-in", "fifo-in.npz"):
        assert (folder / fifo).is_fifo(), f"{fifo} was replaced"
    assert len(results) == len(fz.CASES)
