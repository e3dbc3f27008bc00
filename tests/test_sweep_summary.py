"""The multirun summary, from the files Hydra and the command leave in a sweep folder."""

import json

import torch

from robust_lightning.losses.sample_state import _first_per_id
from robust_lightning.report.sweep import collect_jobs, parse_overrides, sweep_csv, sweep_markdown


def write_job(folder, overrides, acc):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / "results.json").write_text(json.dumps({"test/acc": acc}))


def test_overrides_of_every_form_are_read_as_key_and_value():
    assert parse_overrides(["+loss=gce", "~logger", "++seed=3", "poison.rate=0.2"]) == {
        "loss": "gce",
        "logger": "~",
        "seed": "3",
        "poison.rate": "0.2",
    }


def test_jobs_in_nested_folders_and_with_missing_keys_make_one_table(tmp_path):
    for num, (overrides, acc) in enumerate(
        [(["+loss=gce", "seed=0"], 0.9), (["+loss=gce", "seed=1"], 0.8), (["~logger", "seed=0"], 0.5)]
    ):
        write_job(tmp_path / "group" / str(num), overrides, acc)
    (tmp_path / "group" / "3").mkdir()  # a job that failed before writing results
    jobs = collect_jobs(tmp_path)
    assert [job["results"]["test/acc"] for job in jobs] == [0.9, 0.8, 0.5]
    table = sweep_markdown(jobs).splitlines()
    assert table[1] == "| loss | seed=0 | seed=1 |"
    assert table[3:] == ["| gce | 90.0 | 80.0 |", "| None | 50.0 | — |"]
    assert sweep_csv(jobs).splitlines() == ["loss,seed,logger,test/acc", "gce,0,,0.9", "gce,1,,0.8", ",0,~,0.5"]


def test_rows_gathered_from_ranks_keep_one_row_per_id_the_first():
    ids = torch.tensor([5, 2, 5, 9, 2])
    rows = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    kept_ids, kept_rows = _first_per_id(ids, rows)
    assert dict(zip(kept_ids.tolist(), kept_rows.flatten().tolist(), strict=True)) == {2: 1.0, 5: 0.0, 9: 3.0}


def test_a_single_job_gets_a_one_row_table():
    jobs = [{"overrides": {"loss": "gce"}, "results": {"test/acc": 0.9}}]
    assert sweep_markdown(jobs).splitlines()[1:] == ["| run | value |", "|---|---|", "| loss=gce | 90.0 |"]
