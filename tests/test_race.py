"""Per-shape backend races (fastmeta/race.py). GPUs race cuda against triton; here
the same machinery races cpu against reference on CPU tensors."""

import pytest
import torch

import fastmeta
from conftest import rel_err
from fastmeta import functional as F
from fastmeta import race

pytestmark = pytest.mark.skipif(not fastmeta.backends().extension_built,
                                reason="needs fastmeta._C (the cpu backend)")


@pytest.fixture
def cpu_races(monkeypatch):
    """cpu and reference race on CPU tensors; `timings` sets what each one 'takes'
    and counts the timed calls."""
    monkeypatch.setattr(race, "RACED", {"cpu": ("cpu", "reference")})
    monkeypatch.delenv(race.ENV_VAR, raising=False)
    race.clear()
    timings = {"ms": {"cpu": 1.0, "reference": 2.0}, "calls": []}

    def fake_median_ms(run, name, device):
        run(name)
        timings["calls"].append(name)
        return timings["ms"][name]

    monkeypatch.setattr(race, "_median_ms", fake_median_ms)
    yield timings
    race.clear()


def distances(M, C, D=8):
    return F.squared_distances(torch.randn(1, M, D), torch.randn(1, C, D))


def test_the_faster_backend_wins_per_shape_bucket_and_is_reported(cpu_races):
    cpu_races["ms"] = {"cpu": 3.0, "reference": 1.0}
    distances(10, 5)
    assert fastmeta.last_backend("squared_distances") == "reference"
    assert cpu_races["calls"] == ["cpu", "reference"]

    cpu_races["ms"] = {"cpu": 1.0, "reference": 3.0}
    distances(12, 7)  # same bucket (16, 8): no new race, the old winner runs
    assert fastmeta.last_backend("squared_distances") == "reference"
    assert len(cpu_races["calls"]) == 2

    distances(40, 5)  # bucket (64, 8): races again
    assert fastmeta.last_backend("squared_distances") == "cpu"
    assert len(cpu_races["calls"]) == 4
    times = race.results()
    assert sorted(t["cpu"] for t in times.values()) == [1.0, 3.0]
    assert all(key[0] == "squared_distances" for key in times)
    report = str(fastmeta.backends())
    assert "squared_distances cpu float32 ((1, 16, 8), (1, 8, 8)): reference" in report, report


def test_forced_backends_and_fastmeta_race_0_do_not_race(cpu_races, monkeypatch):
    cpu_races["ms"] = {"cpu": 3.0, "reference": 1.0}
    with fastmeta.use_backend("cpu"):
        distances(10, 5)
    assert fastmeta.last_backend("squared_distances") == "cpu" and not cpu_races["calls"]
    monkeypatch.setenv(race.ENV_VAR, "0")
    distances(10, 5)
    assert fastmeta.last_backend("squared_distances") == "cpu" and not cpu_races["calls"]


def test_shape_bucket_rounds_up_to_powers_of_two():
    assert race.shape_bucket(torch.empty(1, 5, 64), torch.empty(0, 3)) == ((1, 8, 64), (1, 4))


def test_a_real_race_gives_the_same_loss_and_gradients(monkeypatch):
    """Timed for real: whichever backend wins each op and direction (forward and
    backward may differ), the loss and gradients match the float64 computation."""
    monkeypatch.setattr(race, "RACED", {"cpu": ("cpu", "reference")})
    race.clear()
    support = torch.randn(2, 9, 33, requires_grad=True)
    queries = torch.randn(2, 7, 33, requires_grad=True)
    ys = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2]).expand(2, -1)
    yq = torch.randint(0, 3, (2, 7))
    before = support.detach().clone(), queries.detach().clone()
    loss, _ = F.prototypical_loss(support, ys, queries, yq, 3, tau=0.7)
    grads = torch.autograd.grad(loss, (support, queries))
    assert torch.equal(support, before[0]) and torch.equal(queries, before[1])
    ops = {key[0] for key in race.results()}
    assert ops == {"class_prototypes", "prototypical_cross_entropy"}
    race.clear()
    s64, q64 = (x.detach().double().requires_grad_() for x in (support, queries))
    with fastmeta.use_backend("reference"):
        want, _ = F.prototypical_loss(s64, ys, q64, yq, 3, tau=0.7)
    want_grads = torch.autograd.grad(want, (s64, q64))
    assert rel_err(loss, want) < 1e-5
    for got, expected in zip(grads, want_grads):
        assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("forward,backward", [("cpu", "reference"), ("reference", "cpu")])
def test_a_forward_and_a_backward_from_different_backends_agree(forward, backward):
    support = torch.randn(1, 10, 17, dtype=torch.float64, requires_grad=True)
    queries = torch.randn(1, 6, 17, dtype=torch.float64, requires_grad=True)
    ys, yq = torch.arange(5).repeat(2)[None], torch.randint(0, 5, (1, 6))
    with fastmeta.use_backend(forward):
        loss, _ = F.prototypical_loss(support, ys, queries, yq, 5)
    with fastmeta.use_backend(backward):
        grads = torch.autograd.grad(loss, (support, queries))
    with fastmeta.use_backend("reference"):
        want = torch.autograd.grad(F.prototypical_loss(support, ys, queries, yq, 5)[0],
                                   (support, queries))
    for got, expected in zip(grads, want):
        assert rel_err(got, expected) < 1e-12
