"""`fastmeta reproduce omniglot`: argument handling, the commands it would run, and a tiny
run of two recipes on the real Omniglot archives (skipped where they are absent)."""

import json
import os
from pathlib import Path

import pytest

from fastmeta.cli.main import main
from fastmeta.cli.reproduce import RECIPES, Recipe, _episodes

OMNIGLOT = Path(
    os.environ.get("FASTMETA_OMNIGLOT")
    or Path(__file__).resolve().parents[2] / "shared/data/omniglot"
)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["mnist"], "invalid choice: 'mnist'"),
        (["omniglot", "--only", "protonet,maml"], "unknown recipe(s) maml"),
        (["omniglot", "--only", ","], "unknown recipe(s) ','"),
        (["omniglot", "--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
        (["omniglot", "--episodes", "x"], "argument --episodes: must be an integer >= 1, got x"),
        (["omniglot", "--data-dir", "/nonexistent/omniglot"], "--data-dir: not a directory"),
        (["omniglot"], "--data-dir: not a directory: None"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("FASTMETA_OMNIGLOT", raising=False)
    assert main(["reproduce", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not list(tmp_path.iterdir())  # nothing trained


def test_list_prints_each_recipes_commands_and_runs_nothing(capsys, tmp_path):
    argv = ["reproduce", "omniglot", "--data-dir", "DIR", "--out", str(tmp_path), "--list"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    trains = [line for line in lines if " train " in line]
    assert len(trains) == len(RECIPES)
    for name, line in zip(RECIPES, trains):
        assert f"train {RECIPES[name].algorithm} --data omniglot --data-dir DIR" in line
        assert f"--out {tmp_path / name} --test-episodes 1000" in line
    # a test at a run's test episodes is the run's own test; the others need `fastmeta
    # eval`: ProtoNet trains 20-way 5-query, Meta Networks 5-way with 5 queries
    evals = [line.split("--out ")[1].split() for line in lines if " eval " in line]
    assert [(Path(e[0]).name, e[2], e[6]) for e in evals] == [
        ("protonet", "5", "15"),
        ("protonet", "20", "15"),
        ("metanet-5w", "5", "15"),
        ("metanet-5w-lstm", "5", "15"),
    ]
    assert not list(tmp_path.iterdir())


def test_a_test_is_the_runs_own_only_at_its_test_episodes():
    # the run's own test: --eval-* where given, else the training episodes (tests are 1-shot)
    wide = _episodes(60, 5, 1, 10, shots=5) + ("--eval-ways", "20", "--eval-shots", "1")
    recipe = Recipe("protonet", (*wide, "--eval-queries", "15"), ((5, 15), (20, 15)))
    assert [recipe.needs_eval(w, q) for w, q in recipe.tests] == [True, False]
    five_shot = Recipe("protonet", _episodes(20, 15, 1, 10, shots=5), ((20, 15),))
    assert five_shot.needs_eval(20, 15)  # trains and would test 5-shot
    assert not Recipe("maml", _episodes(20, 15, 1, 10), ((20, 15),)).needs_eval(20, 15)


def test_tiny_run_writes_the_table_and_reuses_finished_runs(tmp_path, capsys):
    if not OMNIGLOT.is_dir():
        pytest.skip(f"no Omniglot archives at {OMNIGLOT} (set FASTMETA_OMNIGLOT)")
    argv = ["reproduce", "omniglot", "--data-dir", str(OMNIGLOT), "--out", str(tmp_path)]
    argv += ["--steps", "1", "--episodes", "2"]
    assert main([*argv, "--only", "protonet,metanet-20w"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["recipe"], r["ways"], r["queries"]) for r in rows] == [
        ("protonet", 5, 15),
        ("protonet", 20, 15),
        ("metanet-20w", 20, 5),
    ]
    for row in rows:
        assert row["steps"] == 1 and row["episodes"] == 2 and 0 <= row["accuracy"] <= 1
        assert row["command"].startswith(f"python -m fastmeta train {row['algorithm']} ")
    assert (tmp_path / "protonet" / "eval-test-20w1s.json").is_file()
    table = (tmp_path / "results.md").read_text().splitlines()
    assert (
        len(table) == 2 + len(rows) and "| protonet | 5-way, 15 queries, 2 episodes |" in table[2]
    )
    assert "| 1 steps x 8 20-way 1-shot episodes, " in table[4]  # metanet-20w's training

    summary = tmp_path / "metanet-20w" / "summary.json"
    trained = summary.stat().st_mtime_ns
    capsys.readouterr()
    assert main([*argv, "--only", "metanet-20w"]) == 0
    assert "metanet-20w: trained already" in capsys.readouterr().out
    assert summary.stat().st_mtime_ns == trained
    # the table is every finished recipe's, protonet's from the first call included
    assert json.loads((tmp_path / "results.json").read_text()) == rows

    # a finished run that is not the recipe's (other --steps): one line, nothing trained
    assert main([*argv[:-4], "--steps", "2", "--episodes", "2", "--only", "metanet-20w"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{summary.parent} was trained with --steps 1 (recipe: 2); --force retrains" in err
    assert summary.stat().st_mtime_ns == trained
    # a recipe with a test missing is left out of the table; --force retrains
    (tmp_path / "protonet" / "eval-test-20w1s.json").unlink()  # protonet's 20-way test gone
    assert main([*argv, "--only", "metanet-20w", "--force"]) == 0
    assert summary.stat().st_mtime_ns != trained
    retested = json.loads((tmp_path / "results.json").read_text())
    assert [(r["recipe"], r["ways"]) for r in retested] == [("metanet-20w", 20)]
