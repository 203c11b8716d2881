"""Every script in examples/ runs as a user would run it (a subprocess, exit code 0, the
output it promises), and its main() is imported to assert what the example claims."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given

from tensorlite.testing import GradcheckError, assert_gradients_match, tensors

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(name: str, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
        check=False, cwd=EXAMPLES.parent, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, f"{name}.py exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    return r.stdout


mlp = load("mlp_classifier")
custom_op = load("custom_op")


# ---- examples/mlp_classifier.py ----------------------------------------------------------------
def test_mlp_script_trains_and_reports():
    out = run_example("mlp_classifier")
    steps = re.findall(r"^step +\d+ +loss ([\d.]+)", out, flags=re.MULTILINE)
    losses = [float(v) for v in steps]
    assert len(losses) == 7 and losses[-1] < 0.25 * losses[0]  # the loss fell a lot
    test_acc = float(re.search(r"test accuracy ([\d.]+)", out).group(1))
    assert test_acc >= 0.9
    assert out.count("|") >= 2 * 15  # the ASCII picture of the decision regions


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mlp_reaches_high_accuracy(seed):
    assert mlp.main(steps=300, seed=seed, verbose=False) >= 0.9


def test_mlp_accuracy_comes_from_training():
    assert mlp.main(steps=0, seed=0, verbose=False) < 0.9  # untrained: no better than a line


def test_moons_are_balanced_and_normalised():
    x, y = mlp.make_moons(200, noise=0.1, rng=np.random.default_rng(0))
    assert x.shape == (200, 2) and y.shape == (200,) and y.sum() == 100
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(x.std(axis=0), 1)


# ---- examples/custom_op.py ---------------------------------------------------------------------
def test_custom_op_script_checks_and_catches_the_bug():
    out = run_example("custom_op")
    assert out.count("ok\n") == 2
    assert "naive .sum() check: passes (the bug hides)" in out
    assert "assert_gradients_match: caught" in out and "analytic" in out


@given(tensors(min_value=-20.0, max_value=20.0))
def test_softplus_gradient(x):
    assert_gradients_match(custom_op.softplus, x)


def test_softplus_matches_formula_and_its_derivative():
    custom_op.check_forward()
    x = custom_op.tl.Tensor(np.array([-2.0, 0.0, 3.0]), requires_grad=True)
    custom_op.softplus(x).backward(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(x.grad, np.array([1.0, 2.0, 3.0]) / (1 + np.exp(-x.data)))


def test_buggy_softplus_is_caught_only_by_the_random_cotangent():
    assert custom_op.sum_of_ones_check(custom_op.softplus_buggy)  # the weak check misses it
    with pytest.raises(GradcheckError):
        custom_op.check_gradient(custom_op.softplus_buggy, max_examples=10)
    custom_op.check_gradient(custom_op.softplus, max_examples=10)  # the right one passes


# ---- examples/attention_backward_bug.py --------------------------------------------------------
def test_attention_example_catches_the_q_only_backward_and_passes_the_right_one():
    out = run_example("attention_backward_bug")
    assert "Q-only backward: caught:\ncheck_vjp: argument 2 (shape (1, 1)), element (0, 0)" in out
    assert "dout = [[" in out  # the shrunk example is shown
    assert out.rstrip().endswith("right backward: passes")


# ---- examples/reverse_digits.py: the toy task --------------------------------------------------
reverse_digits = load("reverse_digits")


def test_reverse_digits_learns_the_task_and_greedy_agrees():
    model, acc = reverse_digits.train(steps=80, seed=1, verbose=False)
    assert acc >= 0.9  # chance is 1e-4
    test = reverse_digits.make_batch(200, np.random.default_rng(5))
    assert reverse_digits.greedy_accuracy(model, test) == reverse_digits.accuracy(model, test)


def test_reverse_digits_untrained_is_at_chance():
    _, acc = reverse_digits.train(steps=0, verbose=False)
    assert acc < 0.01


def test_reverse_digits_data_is_digits_then_their_reversal():
    seqs = reverse_digits.make_batch(5, np.random.default_rng(0))
    text = ["".join(reverse_digits.VOCAB[i] for i in row) for row in seqs]
    assert all(t[:4] == t[5:][::-1] and t[4] == ">" and t.replace(">", "").isdigit() for t in text)


# ---- examples/worked/: the solutions of the docs' worked exercises -----------------------------
SOLUTIONS = sorted(p.stem for p in (EXAMPLES / "worked").glob("[!_]*.py"))  # _toy.py: shared
EXERCISE_PAGES = ["autograd.md", "verifying-gradients.md", "gpt.md"]


def exercises_in(page: str) -> list[str]:
    """The solution files a '## Worked exercises' section names, in order: (`name.py`)."""
    text = (EXAMPLES.parent / "docs" / page).read_text(encoding="utf-8")
    section = text.split("\n## Worked exercises\n", 1)
    return re.findall(r"^\d+\. \*\*[^*]+\*\* \(`(\w+)\.py`", section[1], re.MULTILINE) if len(section) > 1 else []


@pytest.mark.parametrize("name", SOLUTIONS)
def test_exercise_solution_runs_and_its_checks_pass(name):
    out = run_example(f"worked/{name}")  # each solution asserts its own claims
    assert out.rstrip().endswith("ok"), out


def test_every_exercise_has_a_solution_and_every_solution_an_exercise():
    named = [n for page in EXERCISE_PAGES for n in exercises_in(page)]
    assert sorted(named) == SOLUTIONS, "docs' worked exercises and examples/worked/ differ"
    assert len(named) == len(set(named)) >= 12
