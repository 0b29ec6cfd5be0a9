"""The training CLI end to end on tiny runs: outputs, resume, eval, bad input. On the CPU
also where a GPU is visible (the CLI then defaults to cuda): every run passes --device cpu."""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastmeta
import fastmeta.cli.train as training
from fastmeta.cli import algorithms
from fastmeta.cli.main import main
from fastmeta.metanet.model import ATTENTION_SCALE
from fastmeta.ops.bn_relu_pool import bn_relu_pool

OMNIGLOT = Path(
    os.environ.get("FASTMETA_OMNIGLOT")
    or Path(__file__).resolve().parents[2] / "shared/data/omniglot"
)
CPU = ["--device", "cpu"]
TINY = [
    *CPU,
    "--steps",
    "4",
    "--val-every",
    "2",
    "--val-episodes",
    "10",
    "--test-episodes",
    "20",
    "--tasks",
    "2",
    "--queries",
    "3",
]
SUMMARY_KEYS = {
    "algorithm",
    "data",
    "args",
    "backend",
    "device",
    "steps",
    "episodes",
    "train_seconds",
    "episodes_per_second",
    "val",
    "test",
    "val_history",
    "paths",
}


def train(out: Path, *options: str, algorithm: str = "protonet") -> dict:
    assert main(["train", algorithm, *TINY, "--out", str(out), *options]) == 0
    return json.loads((out / "summary.json").read_text())


def check_accuracy(accuracy: dict, episodes: int) -> None:
    assert 0 <= accuracy["mean"] <= 1 and accuracy["ci95"] >= 0
    assert accuracy["episodes"] == episodes


def test_protonet_run_writes_summary_curve_and_checkpoint(tmp_path, capsys):
    summary = train(tmp_path)
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["algorithm"] == "protonet" and summary["steps"] == 4
    assert summary["episodes"] == 8 and summary["episodes_per_second"] > 0
    check_accuracy(summary["test"], 20)
    check_accuracy(summary["val"], 10)
    assert [v["step"] for v in summary["val_history"]] == [2, 4]
    assert set(summary["backend"]["ran"].values()) <= set(fastmeta.BACKENDS)
    assert summary["backend"]["ran"]["prototypical_cross_entropy"] in fastmeta.BACKENDS
    assert Path(summary["paths"]["checkpoint"]).is_file()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr()
    assert "test accuracy" in printed.out and "step 4/4" in printed.err


def test_resume_reaches_the_uninterrupted_result(tmp_path):
    schedule = ["--val-every", "3", "--lr-halve-every", "2"]
    whole = train(tmp_path / "whole", "--steps", "6", *schedule)
    train(tmp_path / "cut", "--steps", "4", *schedule)
    resumed = train(tmp_path / "cut", "--steps", "6", *schedule, "--resume")
    assert resumed["test"] == whole["test"] and resumed["steps"] == 6
    a, b = (
        torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("whole", "cut")
    )
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["run"]["history"]["loss"] == b["run"]["history"]["loss"]


def _gradient_norms_at_the_optimizer(monkeypatch) -> list[float]:
    """Records the gradient's global L2 norm each time Adam steps."""
    norms: list[float] = []
    step = torch.optim.Adam.step

    def recording_step(optimizer, *args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        norms.append(torch.nn.utils.get_total_norm(grads).item())
        return step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    return norms


def test_clip_grad_bounds_the_norm_adam_steps_with(tmp_path, monkeypatch, capsys):
    norms = _gradient_norms_at_the_optimizer(monkeypatch)
    train(tmp_path / "free")
    free = norms[:]
    assert len(free) == 4 and min(free) > 1e-3  # so that the clip below bites
    norms.clear()
    clipped = train(tmp_path / "clipped", "--clip-grad", "1e-3")
    assert len(norms) == 4 and max(norms) <= 1e-3 * (1 + 1e-5)
    assert clipped["args"]["clip_grad"] == 1e-3
    # a trajectory setting: resuming with another clip (or none) is refused
    err = run_failing(
        ["train", "protonet", *TINY, "--out", str(tmp_path / "clipped"), "--resume"], capsys
    )
    assert "--clip-grad 0.001 (now None)" in err


def test_eval_other_ways_on_a_trained_run(tmp_path, capsys):
    train(tmp_path)
    assert main(["eval", *CPU, "--out", str(tmp_path), "--ways", "3", "--episodes", "12"]) == 0
    result = json.loads((tmp_path / "eval-test-3w1s.json").read_text())
    check_accuracy(result, 12)
    assert result["ways"] == 3 and "3-way 1-shot" in capsys.readouterr().out


def test_eval_episode_options_shape_validation_test_and_eval(tmp_path, monkeypatch, capsys):
    # protonet trains 4-way 2-shot and is validated and tested 3-way 1-shot with 2 queries
    shapes = []
    evaluate = training.evaluate

    def recording_evaluate(*args, **kwargs):
        shapes.append((args[3], kwargs["ways"], kwargs["shots"], kwargs["queries"]))
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate", recording_evaluate)
    options = ["--ways", "4", "--shots", "2", "--eval-ways", "3", "--eval-shots", "1"]
    summary = train(tmp_path, *options, "--eval-queries", "2")
    assert shapes == [("val", 3, 1, 2), ("val", 3, 1, 2), ("test", 3, 1, 2)]
    assert (summary["args"]["ways"], summary["args"]["eval_ways"]) == (4, 3)
    assert "test accuracy" in capsys.readouterr().out
    # fastmeta eval defaults to the run's test episodes, not its training ones
    assert main(["eval", *CPU, "--out", str(tmp_path), "--episodes", "6"]) == 0
    result = json.loads((tmp_path / "eval-test-3w1s.json").read_text())
    assert (result["ways"], result["shots"], result["queries"]) == (3, 1, 2)
    # without --eval-*: the training episodes
    plain = train(tmp_path / "plain", "--ways", "4")
    assert (plain["args"]["eval_ways"], plain["args"]["eval_queries"]) == (4, 3)


def test_eval_ways_of_a_fixed_head_model_is_refused(tmp_path, capsys):
    argv = ["train", "metanet", *TINY, "--out", str(tmp_path), "--ways", "5", "--eval-ways", "3"]
    err = run_failing(argv, capsys)
    assert "--eval-ways 3: a metanet model has a --ways 5-way output layer" in err
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_maml_family_tiny_run(tmp_path, algorithm):
    if not algorithms.available(algorithm):
        pytest.skip(f"{algorithm} is not in this build of fastmeta")
    summary = train(tmp_path, "--inner-steps", "2", algorithm=algorithm)
    check_accuracy(summary["test"], 20)
    assert summary["backend"]["ran"]["inner_update"] in fastmeta.BACKENDS


def test_metanet_tiny_run_and_resume(tmp_path):
    with fastmeta.use_backend("reference"):  # a stale record of an earlier call
        bn_relu_pool(torch.rand(2, 3, 4, 4), torch.ones(3), torch.zeros(3))
    assert fastmeta.last_backend("bn_relu_pool") == "reference"
    summary = train(tmp_path, "--steps", "2", algorithm="metanet")
    check_accuracy(summary["test"], 20)
    # MLP networks on vectors: the conv-block ops do not run, and the report says so
    assert set(summary["backend"]["ran"]) == {"attention_read", "gradient_mlp"}
    resumed = train(tmp_path, "--steps", "3", "--resume", algorithm="metanet")
    assert resumed["steps"] == 3


def test_metanet_lstm_task_generator_run_eval_and_resume(tmp_path, capsys):
    summary = train(tmp_path, "--steps", "2", "--task-generator", "lstm", algorithm="metanet")
    check_accuracy(summary["test"], 20)
    assert summary["args"]["task_generator"] == "lstm"
    assert set(summary["backend"]["ran"]) == {"attention_read", "gradient_mlp", "gradient_lstm"}
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert "d.w_hh" in state["model"] and "d.w1" not in state["model"]
    # eval rebuilds the LSTM model from the run's arguments
    assert main(["eval", *CPU, "--out", str(tmp_path), "--episodes", "4"]) == 0
    err = run_failing(
        ["train", "metanet", *TINY, "--out", str(tmp_path), "--steps", "3", "--resume"], capsys
    )
    assert "--task-generator 'lstm' (now 'mlp')" in err


def test_metanet_attention_scale_run_eval_and_resume(tmp_path, capsys):
    summary = train(tmp_path, "--steps", "2", "--attention-scale", "5", algorithm="metanet")
    assert summary["args"]["attention_scale"] == 5.0
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert float(state["model"]["attention_scale"]) != 5.0  # learned: two Adam steps
    assert main(["eval", *CPU, "--out", str(tmp_path), "--episodes", "4"]) == 0
    err = run_failing(
        ["train", "metanet", *TINY, "--out", str(tmp_path), "--steps", "3", "--resume"]
        + ["--attention-scale", "none"],
        capsys,
    )
    assert "--attention-scale 5.0 (now None)" in err
    paper = train(
        tmp_path / "paper", "--steps", "1", "--attention-scale", "none", algorithm="metanet"
    )
    assert paper["args"]["attention_scale"] is None
    # a run from before --attention-scale existed was the paper's model: eval rebuilds it
    state = torch.load(tmp_path / "paper" / "checkpoint.pt", weights_only=True)
    assert "attention_scale" not in state["model"]
    del state["args"]["attention_scale"]
    torch.save(state, tmp_path / "paper" / "checkpoint.pt")
    assert main(["eval", *CPU, "--out", str(tmp_path / "paper"), "--episodes", "4"]) == 0
    err = run_failing(
        ["train", "metanet", *TINY, "--out", str(tmp_path / "paper"), "--steps", "2", "--resume"],
        capsys,
    )
    assert f"--attention-scale None (now {ATTENTION_SCALE!r})" in err


def test_omniglot_tiny_run(tmp_path, monkeypatch):
    if not OMNIGLOT.is_dir():
        pytest.skip(f"no Omniglot archives at {OMNIGLOT} (set FASTMETA_OMNIGLOT)")
    pytest.importorskip("PIL", reason="Omniglot decoding needs Pillow")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    summary = train(
        tmp_path / "run", "--data", "omniglot", "--data-dir", str(OMNIGLOT), "--steps", "2"
    )
    check_accuracy(summary["test"], 20)


def run_failing(argv: list[str], capsys) -> str:
    """The CLI's exit status must be 2 and stderr one line (no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "options,message",
    [
        (["--data", "omniglot", "--data-dir", "/nonexistent/omniglot"], "does not exist"),
        (["--data", "omniglot", "--data-dir", "{tmp}"], "no Omniglot data in"),
        (["--data", "omniglot", "--data-dir", "{bad_zip}"], "not a readable zip archive"),
        (
            ["--data", "omniglot", "--data-dir", "{bad_zip}/images_background.zip"],
            "is a file, not a directory",
        ),
        (["--data", "omniglot", "--data-dir", ""], "needs --data-dir"),
        (["--ways", "500"], "exceeds the"),
        (["--eval-ways", "500"], "exceeds the"),
        (["--eval-queries", "0"], "--eval-queries: must be an integer >= 1, got 0"),
        (["--shots", "15", "--queries", "10"], "needs shots + queries = 25 examples"),
        (["--resume"], "no checkpoint to resume from"),
        (["--device", "cpu", "--backend", "cuda"], "backend 'cuda'"),
        (["--steps", "0"], "--steps: must be an integer >= 1"),
        (["--steps", "1.5"], "--steps: must be an integer >= 1, got 1.5"),
        (["--lr", "fast"], "--lr: must be a finite number > 0, got fast"),
        (["--inner-lr", "nan"], "--inner-lr: must be a finite number > 0, got nan"),
        (["--inner-lr", "-0.1"], "--inner-lr: must be a finite number > 0, got -0.1"),
        (["--lr", "inf"], "--lr: must be a finite number > 0, got inf"),
        (["--clip-grad", "0"], "--clip-grad: must be a finite number > 0, got 0"),
        (["--task-generator", "gru"], "--task-generator: invalid choice: 'gru'"),
        (["--attention-scale", "0"], '--attention-scale: must be a finite number > 0 or "none"'),
        (["--attention-scale", "paper"], "got paper"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, options, message):
    monkeypatch.delenv("FASTMETA_OMNIGLOT", raising=False)
    bad_zip = tmp_path / "bad"
    bad_zip.mkdir()
    (bad_zip / "images_background.zip").write_text("not a zip")
    options = [o.format(tmp=tmp_path, bad_zip=bad_zip) for o in options]
    err = run_failing(["train", "protonet", *CPU, "--out", str(tmp_path / "run"), *options], capsys)
    assert message in err


def test_unknown_algorithm_and_unavailable_algorithm(tmp_path, capsys, monkeypatch):
    assert "invalid choice: 'reptile'" in run_failing(["train", "reptile"], capsys)
    monkeypatch.delattr(fastmeta, "MetaNetwork", raising=False)
    err = run_failing(["train", "metanet", *CPU, "--out", str(tmp_path)], capsys)
    assert "algorithm metanet is not available in this build of fastmeta yet" in err


@pytest.mark.parametrize("command", ["eval", "resume"])
def test_a_checkpoint_without_the_expected_keys_is_one_line_and_exit_2(tmp_path, capsys, command):
    """It was a KeyError traceback (exit 1)."""
    torch.save({"args": {"algorithm": "protonet"}, "model": {}}, tmp_path / "checkpoint.pt")
    if command == "eval":
        argv = ["eval", *CPU, "--out", str(tmp_path)]
    else:
        argv = ["train", "protonet", *TINY, "--out", str(tmp_path), "--resume"]
    err = run_failing(argv, capsys)
    assert "not a fastmeta checkpoint (missing optimizer, run, sampler_rng, torch_rng)" in err


def test_an_interrupt_offers_resume_only_when_there_is_a_checkpoint(tmp_path, capsys, monkeypatch):
    """It said "continue with --resume" before the first checkpoint too."""

    def interrupted(args, ranks):
        raise KeyboardInterrupt

    commands = importlib.import_module("fastmeta.cli.main").COMMANDS
    monkeypatch.setitem(commands, "train", interrupted)
    argv = ["train", "protonet", *CPU, "--out", str(tmp_path)]
    assert main(argv) == 130
    assert "interrupted (no checkpoint yet: none to resume)" in capsys.readouterr().err
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert main(argv) == 130
    assert "interrupted (continue with --resume)" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    train(tmp_path)
    err = run_failing(
        ["train", "protonet", *TINY, "--out", str(tmp_path), "--resume", "--ways", "3"], capsys
    )
    assert "cannot resume" in err and "--ways 5 (now 3)" in err


def test_module_entry_point_help():
    done = subprocess.run(
        [sys.executable, "-m", "fastmeta", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "--resume" in done.stdout and "protonet" in done.stdout
