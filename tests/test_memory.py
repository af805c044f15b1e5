"""Memory-based certification (npg/memory.py): its guarantee about a sequence of queries.

The rules are geometry, so a scripted inner mode (answers fixed in advance) tests them exactly;
the paper's mu counterexample shows the memory stopping the contradiction paper mode gives."""

import random
import subprocess
import sys

import pytest
import torch

from ucan_smoothing.core.certificate import ABSTAIN, Certificate
from ucan_smoothing.core.regions import CertifiedRegion, Scaling
from ucan_smoothing.npg.counterexamples import shift_counterexample
from ucan_smoothing.npg.memory import MEMORY_CONFLICT, MEMORY_OK, MEMORY_SHRUNK, MemorySmooth


class Scripted:
    """An inner mode whose answer at each 1-D point is given: ``{point: (class, l2 radius)}``."""

    primary_norm = 2

    def __init__(self, answers):
        self.answers = answers

    def certify(self, x, n0, n, alpha, batch_size=1000, generator=None, progress=False):
        cls, radius = self.answers[float(x[0])]
        regions = (CertifiedRegion(2, radius, Scaling.isotropic(1)),) if cls != ABSTAIN else ()
        return Certificate(cls, 0.99, 2, regions, False, n0, n, alpha)

    def predict(self, x, n, alpha, batch_size=1000, generator=None):
        return self.answers[float(x[0])][0]


def ask(memory, point):
    return memory.certify(torch.tensor([point], dtype=torch.float64), 1, 1, 0.001)


def test_the_memory_abstains_on_conflicts_and_shrinks_over_earlier_answers():
    memory = MemorySmooth(Scripted({0.0: (0, 1.0), 3.0: (1, 5.0), 0.5: (1, 2.0), 2.9: (1, 1.0)}))
    first = ask(memory, 0.0)
    assert first.prediction == 0 and first.extra["memory"] == MEMORY_OK and first.radius(2) == 1.0
    second = ask(memory, 3.0)  # its region of radius 5 would hold the class-0 answer at 0
    assert second.prediction == 1 and second.extra["memory"] == MEMORY_SHRUNK
    assert 2.999999 < second.radius(2) < 3.0
    third = ask(memory, 0.5)  # inside the class-0 region of the first answer
    assert third.prediction == ABSTAIN and third.extra["memory"] == MEMORY_CONFLICT and third.radius(2) == 0
    fourth = ask(memory, 2.9)  # inside the region of the same class: answered
    assert fourth.prediction == 1 and fourth.extra["memory"] == MEMORY_OK
    assert not any(c.is_certificate for c in (first, second, third, fourth))
    assert memory.predict(torch.tensor([0.5], dtype=torch.float64), 1, 0.001) == ABSTAIN  # PREDICT keeps to the memory too


@pytest.mark.parametrize("seed", range(5))
def test_no_answer_contradicts_an_issued_region_on_random_sequences(seed):
    rng = random.Random(seed)
    points = [round(rng.uniform(-5, 5), 6) for _ in range(60)]
    memory = MemorySmooth(Scripted({p: (rng.randrange(3), rng.uniform(0, 3)) for p in points}))
    answered = []
    for p in points:
        certificate = ask(memory, p)
        if not certificate.abstained:
            answered.append((p, certificate))
    assert len(answered) > 10
    for p, a in answered:  # the guarantee, both ways round
        for q, b in answered:
            if a.prediction != b.prediction:
                assert not a.contains(torch.tensor([q - p], dtype=torch.float64)), (p, q)


def test_the_memory_stops_the_paper_modes_contradiction_on_the_mu_counterexample():
    ce = shift_counterexample()
    paper = ce.paper_mode()
    claim = paper.certify(ce.x, 100, 10_000, 0.001, batch_size=10_000, generator=0)
    inside = torch.tensor([-0.5])  # well inside the claimed ball, where the smoothed class is 0
    assert claim.prediction == 1 and claim.radius(2) > 0.5 and ce.exact_class(inside) == 0
    assert paper.certify(inside, 100, 10_000, 0.001, batch_size=10_000, generator=1).prediction == 0
    memory = MemorySmooth(paper)
    assert memory.certify(ce.x, 100, 10_000, 0.001, batch_size=10_000, generator=0).prediction == 1
    second = memory.certify(inside, 100, 10_000, 0.001, batch_size=10_000, generator=1)
    assert second.prediction == ABSTAIN and second.extra["memory"] == MEMORY_CONFLICT


def ucan(*args):
    return subprocess.run([sys.executable, "-m", "ucan_smoothing.cli", *map(str, args)], capture_output=True,
                          text=True)


def test_memory_from_the_cli_resumes_and_refuses_what_it_cannot_guarantee(tmp_path, mnist_run):
    from ucan_smoothing.results import read_results
    from ucan_smoothing.training import train_generator

    run = train_generator(npg={"kind": "input_dependent", "channels": [4, 4, 4, 4]}, base=str(mnist_run), max_train=128, max_test=32, epochs=1,
                          out=str(tmp_path / "npg"), progress=False, seed=0)
    out = tmp_path / "memory.tsv"
    common = ["--paper-mode", "--memory", "--out", out, "--n0", 20, "--n", 200, "--skip", 100,
              "--no-contract-check", "--no-progress"]
    done = ucan("certify", run, *common, "--max", 2)
    assert done.returncode == 0, done.stderr
    done = ucan("certify", run, *common, "--max", 4)  # resumes with the memory of the first two
    assert done.returncode == 0, done.stderr
    rows = read_results(out)
    assert [row["idx"] for row in rows] == [0, 100, 200, 300]
    assert all(not row["is_certificate"] and row["memory"] in ("ok", "conflict", "shrunk") for row in rows)
    state = torch.load(str(out) + ".memory.pt", weights_only=True)
    assert state["queried"] == [0, 100, 200, 300]
    # rows without their memory: refused, one line
    (tmp_path / "memory.tsv.memory.pt").unlink()
    done = ucan("certify", run, *common, "--max", 5)
    assert done.returncode == 2 and "memory" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    # --memory guards the paper mode only
    done = ucan("certify", mnist_run, "--memory", "--out", tmp_path / "x.tsv", "--n", 200)
    assert done.returncode == 2 and "--memory goes with --paper-mode" in done.stderr


def test_a_file_written_before_memory_existed_still_resumes(tmp_path, mnist_run):
    import json
    out = tmp_path / "old.tsv"
    common = ["--out", out, "--n0", 20, "--n", 200, "--skip", 100, "--no-contract-check", "--no-progress"]
    assert ucan("certify", mnist_run, *common, "--max", 1).returncode == 0
    sidecar = json.loads(out.with_name("old.tsv.json").read_text())
    assert "memory" not in sidecar["config"]
    done = ucan("certify", mnist_run, *common, "--max", 2)
    assert done.returncode == 0, done.stderr
