"""Per-shape backend races (fastmeta/race.py). GPUs race cuda against triton; here
the same machinery races cpu against reference on CPU tensors."""

import threading
import time

import pytest
import torch
from conftest import rel_err

import fastmeta
from fastmeta import functional as F
from fastmeta import race
from fastmeta.ops import attention_read
from fastmeta.ops.squared_distances import SQUARED_DISTANCES

pytestmark = pytest.mark.skipif(
    not fastmeta.backends().extension_built, reason="needs fastmeta._C (the cpu backend)"
)


@pytest.fixture
def racing_on_cpu(racing, monkeypatch):
    """cpu and reference race on CPU tensors (conftest's `racing`: races allowed)."""
    monkeypatch.setattr(race, "RACED", {"cpu": ("cpu", "reference")})


@pytest.fixture
def cpu_races(racing_on_cpu, monkeypatch):
    """A fake timer: `timings["ms"]` sets what each backend 'takes'; `timings["calls"]`
    records the timed calls in order."""
    timings = {"ms": {"cpu": 1.0, "reference": 2.0}, "calls": []}

    def fake_time_ms(run, name, device):
        run(name)
        timings["calls"].append(name)
        return timings["ms"][name]

    monkeypatch.setattr(race, "_time_ms", fake_time_ms)
    return timings


def distances(M, C, D=8):
    return F.squared_distances(torch.randn(1, M, D), torch.randn(1, C, D))


def test_the_faster_backend_wins_per_shape_bucket_and_is_reported(cpu_races):
    cpu_races["ms"] = {"cpu": 3.0, "reference": 1.0}
    distances(10, 5)
    assert fastmeta.last_backend("squared_distances") == "reference"
    assert len(cpu_races["calls"]) == 2 * race.SAMPLES

    cpu_races["ms"] = {"cpu": 1.0, "reference": 3.0}
    distances(12, 7)  # same bucket (16, 8): no new race, the old winner runs
    assert fastmeta.last_backend("squared_distances") == "reference"
    assert len(cpu_races["calls"]) == 2 * race.SAMPLES

    distances(40, 5)  # bucket (64, 8): races again
    assert fastmeta.last_backend("squared_distances") == "cpu"
    assert len(cpu_races["calls"]) == 4 * race.SAMPLES
    outcomes = race.results()
    assert sorted(o.times["cpu"] for o in outcomes.values()) == [1.0, 3.0]
    assert all(key[0] == "squared_distances" for key in outcomes)
    report = str(fastmeta.backends())
    assert (
        "squared_distances cpu float32 ('forward', (1, 16, 8), (1, 8, 8)): reference "
        "(cpu 3.000 ms; reference 1.000 ms)"
    ) in report, report


def test_timed_calls_are_interleaved(cpu_races):
    distances(10, 5)
    calls = cpu_races["calls"]
    assert calls.count("cpu") == calls.count("reference") == race.SAMPLES
    rounds = [calls[i : i + 2] for i in range(0, len(calls), 2)]
    assert all(sorted(r) == ["cpu", "reference"] for r in rounds), calls
    firsts = [r[0] for r in rounds]  # each goes first in about half the rounds
    assert abs(firsts.count("cpu") - firsts.count("reference")) <= 1, calls


def test_a_contender_that_raises_is_dropped_with_its_reason(cpu_races, monkeypatch):
    def no_kernel(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setitem(SQUARED_DISTANCES.forward.impls, "cpu", no_kernel)
    cpu_races["ms"] = {"cpu": 1.0, "reference": 3.0}
    queries, prototypes = torch.randn(1, 10, 8), torch.randn(1, 5, 8)
    out = F.squared_distances(queries, prototypes)
    assert fastmeta.last_backend("squared_distances") == "reference"
    assert torch.allclose(out, torch.cdist(queries, prototypes) ** 2, atol=1e-4)
    assert not cpu_races["calls"]  # one contender left: it wins untimed
    (outcome,) = race.results().values()
    assert outcome.dropped == {
        "cpu": "RuntimeError: no kernel image is available for execution on the device"
    }
    report = str(fastmeta.backends())
    assert (
        "squared_distances cpu float32 ('forward', (1, 16, 8), (1, 8, 8)): reference "
        "(cpu dropped: RuntimeError: no kernel image is available"
    ) in report, report


def test_when_every_contender_raises_the_first_error_is_raised(cpu_races, monkeypatch):
    tried = []

    def failing(name):
        def impl(*args):
            tried.append(name)
            raise ValueError(f"{name} failed")

        return impl

    for name in ("cpu", "reference"):
        monkeypatch.setitem(SQUARED_DISTANCES.forward.impls, name, failing(name))
    with pytest.raises(ValueError, match="cpu failed") as raised:
        distances(10, 5)
    assert tried == ["cpu", "reference"]
    assert any("reference failed" in note for note in raised.value.__notes__)
    assert not race.results()  # nothing cached: the next call races again


def test_deterministic_algorithms_stop_the_race(cpu_races):
    cpu_races["ms"] = {"cpu": 3.0, "reference": 1.0}
    torch.use_deterministic_algorithms(True)
    distances(10, 5)
    assert fastmeta.last_backend("squared_distances") == "cpu"  # the first contender
    assert not cpu_races["calls"] and not race.results()


def test_threads_reaching_one_bucket_race_it_once(cpu_races, monkeypatch):
    timed = []

    def slow_time_ms(run, name, device):
        run(name)
        timed.append(name)
        time.sleep(0.002)
        return {"cpu": 1.0, "reference": 2.0}[name]

    monkeypatch.setattr(race, "_time_ms", slow_time_ms)
    barrier = threading.Barrier(2)
    ran = []

    def call():
        barrier.wait()
        distances(10, 5)
        ran.append(fastmeta.last_backend("squared_distances"))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ran == ["cpu", "cpu"]
    assert len(timed) == 2 * race.SAMPLES
    assert len(race.results()) == 1


def test_a_contender_calling_its_own_bucket_gets_the_first_contender(racing_on_cpu):
    x = torch.empty(3)
    inner = []

    def run(name):
        inner.append(race.winner("op", x.device, x.dtype, ["cpu", "reference"], race.Race(run, x)))

    assert race.winner("op", x.device, x.dtype, ["cpu", "reference"], race.Race(run, x)) in (
        "cpu",
        "reference",
    )
    assert set(inner) == {"cpu"}


def test_attention_read_races(cpu_races):
    cpu_races["ms"] = {"cpu": 3.0, "reference": 1.0}
    attention = torch.randn(2, 3, 4, requires_grad=True)
    weights = torch.randn(2, 4, 5, 6, requires_grad=True)
    x = torch.randn(2, 3, 1, 6, requires_grad=True)
    attention_read(attention, weights, x).sum().backward()
    assert fastmeta.last_backend("attention_read") == "reference"
    tags = sorted(key[3][0] for key in race.results() if key[0] == "attention_read")
    assert tags == ["backward", "forward"]
    assert (
        "attention_read cpu float32 ('forward', (2, 4, 4), (2, 4, 8, 8), (2, 4, 1, 8)): "
        "reference" in str(fastmeta.backends())
    )


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


def test_a_real_race_gives_the_same_loss_and_gradients(racing_on_cpu):
    """Timed for real: whichever backend wins each op and direction (forward and
    backward may differ), the loss and gradients match the float64 computation."""
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
        want = torch.autograd.grad(
            F.prototypical_loss(support, ys, queries, yq, 5)[0], (support, queries)
        )
    for got, expected in zip(grads, want):
        assert rel_err(got, expected) < 1e-12
