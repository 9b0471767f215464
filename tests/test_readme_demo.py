"""tests/check_readme_demo.py (run by .ci/run after the demo) reads the README's table and
compares a run's results.json with it."""
import pytest

from check_readme_demo import differences, readme_table, run_dir
from conftest import compose
from hbllm.config import validate


@pytest.fixture(scope="module")
def table():
    return readme_table()


def as_results(table, fp_scale=1.0, q_scale=1.0, bits=None):
    return {"status": "done",
            "baseline_ppl": {d: fp * fp_scale for d, (fp, _) in table["ppl"].items()},
            "ppl": {d: q * q_scale for d, (_, q) in table["ppl"].items()},
            "bits": dict(zip(("paper", "full"), bits or table["bits"]))}


def test_readme_table_covers_the_demo_datasets(table):
    demo = validate(compose("experiment=demo", "data.local_dir=../shared/data"))
    assert sorted(table["ppl"]) == sorted(demo.eval.datasets)
    assert all(fp < q for fp, q in table["ppl"].values())
    assert 1 < table["bits"][0] < table["bits"][1]


def test_differences_flag_what_is_out_of_tolerance(table):
    assert differences(table, as_results(table, fp_scale=1.009, q_scale=0.975)) == []
    assert len(differences(table, as_results(table, fp_scale=1.02))) == len(table["ppl"])
    assert len(differences(table, as_results(table, q_scale=1.04))) == len(table["ppl"])
    paper, full = table["bits"]
    assert len(differences(table, as_results(table, bits=(paper, full + 0.001)))) == 1
    assert differences(table, dict(as_results(table), status="running")) != []


def test_run_dir_is_the_demo_run_directory():
    path = run_dir(["experiment=demo", "data.local_dir=../shared/data"])
    assert path.parts[-4:-1] == ("outputs", "gemma3-270m", "hbllm_row")
    assert path.name.startswith("wiki_sample-") and len(path.name) == len("wiki_sample-") + 12
