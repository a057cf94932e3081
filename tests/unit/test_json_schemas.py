"""docs/json.md documents every key of every ``--json`` object, and nothing that is not there."""
import contextlib
import io
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from edgec.app import results
from edgec.app.cli import ERROR_SCHEMA, fail
from edgec.app.python_api import StepReport
from edgec.app.recipe import PLAN_SCHEMA, REPORT_SCHEMA, Plan, execute
from edgec.core.result import Result
from edgec.generation import GenerateResult
from edgec.prune.result import PruneResult
from edgec.train.result import FinetuneResult

DOC = Path(__file__).resolve().parents[2] / "docs" / "json.md"
RESULT_CLASSES = [cls for cls in vars(results).values()
                  if isinstance(cls, type) and issubclass(cls, Result) and cls is not Result] + [
    PruneResult, FinetuneResult, StepReport, GenerateResult]


def documented() -> dict[str, set[str]]:
    """{schema: keys} from the doc: each `### `schema`` section's table rows, plus the keys of the schemas
    it says it includes."""
    sections = re.split(r"^### `(edgec\.[^`]+)`\s*$", DOC.read_text(), flags=re.M)
    own, includes = {}, {}
    for name, body in zip(sections[1::2], sections[2::2]):
        own[name] = set(re.findall(r"^\| `([a-z_0-9]+)` \|", body, flags=re.M))
        includes[name] = re.findall(r"Includes `(edgec\.[^`]+)`", body)
    return {name: own[name].union(*(own[i] for i in includes[name])) for name in own}


def dataclass_keys(cls) -> set[str]:
    return {"schema"} | {f.name for f in fields(cls)}


def test_every_result_class_has_its_own_schema():
    names = [cls.SCHEMA for cls in RESULT_CLASSES]
    assert len(RESULT_CLASSES) >= 14 and all(re.fullmatch(r"edgec\.[a-z.]+/\d+", n) for n in names), names
    assert len(set(names)) == len(names), "two result classes share a schema name"


@pytest.mark.parametrize("cls", RESULT_CLASSES, ids=lambda c: c.__name__)
def test_result_keys_match_the_doc(cls):
    doc = documented()
    assert cls.SCHEMA in doc, f"docs/json.md has no section for {cls.SCHEMA}"
    if cls is results.EvalResult:  # a dict built by edgec.evaluation: only its own key is typed here
        assert {"schema", "input", "kind", "metrics", "latency"} <= doc[cls.SCHEMA]
        assert results.EvalResult(report={"input": "x"}).to_dict() == {"schema": "edgec.eval/1", "input": "x"}
        return
    keys = dataclass_keys(cls)
    assert keys - doc[cls.SCHEMA] == set(), f"{cls.SCHEMA}: keys missing from docs/json.md"
    assert doc[cls.SCHEMA] - keys == set(), f"{cls.SCHEMA}: docs/json.md documents keys the result lacks"


def test_to_dict_starts_with_the_schema_and_round_trips_fields():
    res = results.SavedCheckpoint(output="m.pt", arch="resnet", params=3, bytes=12, digest="ab", file_bytes=99)
    d = res.to_dict()
    assert list(d)[0] == "schema" and d["schema"] == "edgec.checkpoint/1"
    again = results.ZooCreateResult(**res.field_values(), config={}, seed=0)  # what api._saved does
    assert again.to_dict()["schema"] == "edgec.zoo.create/1" and again.params == 3


def test_recipe_plan_and_report_keys_match_the_doc(tmp_path):
    doc = documented()
    plan = Plan(recipe=Path("r.toml"), name="n", out_dir=tmp_path / "o", steps=[])
    described = plan.describe()
    assert described["schema"] == PLAN_SCHEMA and set(described) == doc[PLAN_SCHEMA]
    report = execute(plan)
    assert report["schema"] == REPORT_SCHEMA and set(report) == doc[REPORT_SCHEMA]
    assert json.loads((tmp_path / "o" / "report.json").read_text()) == report


def test_error_object_matches_the_doc():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        fail("input", "no such file: x.pt\n(second line)", 2, as_json=True)
    assert exc.value.code == 2
    obj = json.loads(out.getvalue())
    assert obj == {"schema": ERROR_SCHEMA, "error": "no such file: x.pt (second line)", "exit_code": 2, "kind": "input"}
    assert set(obj) == documented()[ERROR_SCHEMA]
