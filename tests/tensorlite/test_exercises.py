"""python -m tensorlite.exercises: every reference solution in examples/exercises/ passes its
check, every untouched starter fails it, a wrong answer is reported as a shrunk
counterexample (never a traceback into the grader), and list / start / hint do what
docs/exercises.md says. The graders' own formulas are checked against gpt's."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tensorlite.exercises import EXERCISES, STARTERS, grader, transformer
from tensorlite.exercises import __main__ as cli
from tensorlite.exercises.grader import Failure

REPO = Path(__file__).resolve().parents[2]
REFERENCES = REPO / "examples" / "exercises"
NAMES = [e.name for e in EXERCISES]
FEW = "8"  # hypothesis examples per check here, to keep the suite fast


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tensorlite.exercises", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)


def functions(path: Path) -> list[str]:
    return [n.name for n in ast.parse(path.read_text(encoding="utf-8")).body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef))]


@pytest.mark.parametrize("name", NAMES)
def test_the_reference_solution_passes_its_check(name, capsys):
    assert cli.main(["check", name, "--dir", str(REFERENCES), "--examples", FEW]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"passed {name} ") and "\n  - " in out


@pytest.mark.parametrize("name", NAMES)
def test_the_untouched_starter_fails_its_check_naming_the_line(name, capsys):
    assert cli.main(["check", name, "--dir", str(STARTERS), "--examples", FEW]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"FAILED {name} ")
    assert re.search(rf"is not written yet \({name}\.py, line \d+, in \w+: raise NotImplementedError\)", out)


def test_at_least_twelve_exercises_each_with_a_starter_a_reference_and_a_doc_section():
    assert len(NAMES) >= 12 and len(set(NAMES)) == len(NAMES)
    assert sorted(p.stem for p in STARTERS.glob("[!_]*.py")) == sorted(NAMES)
    assert sorted(p.stem for p in REFERENCES.glob("*.py")) == sorted(NAMES)
    for e in EXERCISES:
        # the same functions and classes, and the starter's given code kept in the reference
        assert functions(e.starter) == functions(REFERENCES / f"{e.name}.py"), e.name
        assert "NotImplementedError" not in (REFERENCES / f"{e.name}.py").read_text()
        page = (REPO / "docs" / e.doc).read_text(encoding="utf-8")
        assert re.search(rf"^#+ {re.escape(e.section)}$", page, re.MULTILINE), (e.name, e.section)
        assert len(e.hints) >= 2


def test_docs_exercises_md_lists_every_exercise_in_order():
    text = (REPO / "docs" / "exercises.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\d+\. \*\*`(\w+)`\*\*", text, re.MULTILINE)
    assert listed == NAMES


def test_list_prints_one_line_per_exercise_name_first():
    r = run("list")
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert [line.split()[0] for line in lines] == NAMES
    assert all(f"(docs/{e.doc}: {e.section})" in line for e, line in zip(EXERCISES, lines))


def test_start_writes_every_starter_and_never_overwrites(tmp_path):
    folder = tmp_path / "mine"
    r = run("start", str(folder))
    assert r.returncode == 0, r.stderr
    assert sorted(p.stem for p in folder.glob("*.py")) == sorted(NAMES)
    (folder / "mul_backward.py").write_text("# my work\n")
    again = run("start", str(folder))
    assert again.returncode == 2 and again.stdout == ""
    assert len(again.stderr.splitlines()) == 1 and "already exists" in again.stderr
    assert (folder / "mul_backward.py").read_text() == "# my work\n"  # untouched
    r = run("check", "top_p", "--dir", str(folder), "--examples", "3")
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert "top_p_filter is not written yet (top_p.py, line" in r.stdout


def test_a_backward_that_ignores_dout_is_shown_a_shrunk_counterexample(tmp_path):
    text = (REFERENCES / "mul_backward.py").read_text()
    wrong = "return unbroadcast(y + 0 * dout, x.shape), unbroadcast(dout * x, y.shape)"
    (tmp_path / "mul_backward.py").write_text(
        text.replace("return unbroadcast(dout * y, x.shape), unbroadcast(dout * x, y.shape)", wrong))
    r = run("check", "mul_backward", "--dir", str(tmp_path), "--examples", "20")
    assert r.returncode == 1 and r.stderr == "" and "Traceback" not in r.stdout
    # an all-ones dout would not catch it; the random one does, and shrinks it to one element
    assert re.search(r"wrong gradient: for x \(shape \(1?,?\)\), element \(0?,?\): expected "
                     r"[-\d.e]+ \(finite differences\), got [-\d.e]+", r.stdout), r.stdout
    assert "\n  x = " in r.stdout and "\n  y = " in r.stdout and "\n  dout = " in r.stdout


def test_max_with_ties_must_share_the_gradient(tmp_path):
    text = (REFERENCES / "max_backward.py").read_text()
    (tmp_path / "max_backward.py").write_text(text.replace(
        "share = np.expand_dims(dout, axis) / is_max.sum(axis=axis, keepdims=True)",
        "share = np.expand_dims(dout, axis)"))
    with pytest.raises(Failure, match=r"dx, element \(\d+(, \d+)*,?\): expected [-\d.]+, got"):
        EXERCISES[NAMES.index("max_backward")].grade(cli.load(tmp_path / "max_backward.py",
                                                              "max_backward"), 20)


def test_the_learners_exception_is_shown_as_their_line_with_the_inputs(tmp_path):
    text = (REFERENCES / "attention_backward.py").read_text()
    (tmp_path / "attention_backward.py").write_text(
        text.replace("    dk = ds.swapaxes(-1, -2) @ q * s\n", "    dk = ds.swapaxes(-1, -2) @ q * scale\n"))
    r = run("check", "attention_backward", "--dir", str(tmp_path), "--examples", "10")
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert re.search(r"attention_backward raised NameError: name 'scale' is not defined\n  at "
                     r"attention_backward\.py, line \d+, in attention_backward: "
                     r"dk = ds\.swapaxes\(-1, -2\) @ q \* scale\n", r.stdout), r.stdout
    assert "\n  q (shape (" in r.stdout


def test_a_recursive_topological_sort_fails_on_the_deep_chain(tmp_path):
    text = (REFERENCES / "backward_driver.py").read_text()
    recursive = text.replace('''    order, visited = [], set()
    stack = [(root, False)]''', '''    order, visited = [], set()

    def visit(node):
        if id(node) not in visited:
            visited.add(id(node))
            for p in node.parents:
                visit(p)
            order.append(node)

    visit(root)
    return order
    stack = [(root, False)]''')
    (tmp_path / "backward_driver.py").write_text(recursive)
    module = cli.load(tmp_path / "backward_driver.py", "backward_driver")
    with pytest.raises(Failure, match="on a chain of 3000 nodes: topological_order raised "
                                      "RecursionError"):
        EXERCISES[NAMES.index("backward_driver")].grade(module, 10)


def test_hint_gives_one_hint_at_a_time_and_remembers(tmp_path, capsys):
    def hint(name):
        assert cli.main(["hint", name, "--dir", str(tmp_path)]) == 0
        return capsys.readouterr().out

    hints = EXERCISES[NAMES.index("adamw_step")].hints
    for i in range(len(hints)):
        assert hint("adamw_step") == f"adamw_step, hint {i + 1} of {len(hints)}: {hints[i]}\n"
    assert json.loads((tmp_path / cli.HINTS_FILE).read_text()) == {"adamw_step": len(hints)}
    assert "examples/exercises/adamw_step.py" in hint("adamw_step")  # all shown: the solution
    assert hint("top_p").startswith("top_p, hint 1 of")
    (tmp_path / cli.HINTS_FILE).write_text("{broken")
    assert hint("top_p").startswith("top_p, hint 1 of")


def test_bad_input_gets_one_line_and_exit_2_as_a_command_too():
    r = run("check", "top_p", "--dir", "no/such/dir")
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr


@pytest.mark.parametrize("args", [["check", "nope"], ["hint", "nope"], ["bogus"], [],
                                  ["check", "top_p", "--examples", "0"],
                                  ["hint", "top_p", "--dir", "no/such/dir"]])
def test_bad_input_gets_one_line_and_exit_2(args, capsys):
    assert cli.main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: "), err


# ---- the graders' formulas against gpt's ----------------------------------------------------
def test_the_graders_adamw_and_top_p_agree_with_gpt():
    from gpt.optim import adamw_update
    from gpt.sample import filter_probs

    rng = np.random.default_rng(0)
    for t in (1, 2, 7):
        p, g, m = (rng.standard_normal(5) for _ in range(3))
        v = rng.random(5)
        expected = transformer.adamw(p, g, m, v, t, 0.01, 0.9, 0.99, 1e-8, 0.1)
        adamw_update(p, g, m, v, 0.01, 0.9, 0.99, 1e-8, 0.1, t)  # in place
        for e, got in zip(expected, (p, m, v)):
            np.testing.assert_allclose(got, e, rtol=1e-12)
    probs = np.array([0.1, 0.3, 0.1, 0.3, 0.2])
    for p in (0.05, 0.35, 0.65, 0.75, 0.95, 1.0):
        np.testing.assert_allclose(transformer.top_p(probs, p),
                                   filter_probs(np.log(probs), top_p=p), atol=1e-12)


def test_the_kv_cache_graders_full_forward_is_the_starters_attention_layer():
    starter = cli.load(STARTERS / "kv_cache_decode.py", "kv_cache_decode")
    rng = np.random.default_rng(1)
    x, w_qkv, w_out = rng.standard_normal((5, 6)), rng.standard_normal((6, 18)), rng.standard_normal((6, 6))
    np.testing.assert_allclose(transformer.full_forward(x, w_qkv, w_out, 2),
                               starter.attention_layer(x, w_qkv, w_out, 2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("body, said", [
    ("def softmax_backward(dout, x)\n    return x\n", r"softmax_backward\.py, line 1: SyntaxError"),
    ("import numpy as np\nnp.zeros(2)[5]\n", (r"importing softmax_backward\.py raised IndexError: "
                                              r".*\n  at softmax_backward\.py, line 2, in <module>")),
    ("def other(x):\n    return x\n", r"softmax_backward\.py has no function softmax_backward"),
    ("def softmax_backward(dout, x):\n    pass\n",
     r"softmax_backward returned None \(a missing return\?\)\n  with\n  dout \(shape"),
    ("def softmax_backward(dout, x):\n    return 'dx'\n",
     r"softmax_backward must return arrays of numbers, got str\n  with\n  dout \(shape"),
    ("def softmax_backward(dout, x):\n    return dout[..., :1]\n",
     r"wrong shape: your gradient for x has shape \((\d+, )*1,?\), the input \((\d+, )*\d+,?\)"),
    ("import sys\ndef softmax_backward(dout, x):\n    sys.exit(3)\n",
     r"softmax_backward raised SystemExit: 3\n  at softmax_backward\.py, line 3"),
])
def test_whatever_the_learners_file_does_the_answer_is_a_report_not_a_traceback(
        tmp_path, capsys, body, said):
    (tmp_path / "softmax_backward.py").write_text(body)
    assert cli.main(["check", "softmax_backward", "--dir", str(tmp_path), "--examples", "5"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("FAILED softmax_backward") and "Traceback" not in out + err
    assert re.search(said, out), out


def test_an_endless_loop_is_stopped_and_shown_where_it_was(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(grader, "TIME_LIMIT", 0.5)
    text = (REFERENCES / "backward_driver.py").read_text()
    (tmp_path / "backward_driver.py").write_text(  # forgets to pop: the stack never empties
        text.replace("        node, expanded = stack.pop()", "        node, expanded = stack[-1]"))
    assert cli.main(["check", "backward_driver", "--dir", str(tmp_path), "--examples", "5"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"topological_order did not return within 0.5 s \(an endless loop\?\); it "
                     r"was at backward_driver\.py, line \d+, in topological_order: ", out), out


@pytest.mark.parametrize("change", [
    ("    x = tl.Tensor(x, requires_grad=True)\n", "    return tl.hvp(f, [x], [v])[0].data\n"),
    ("import tensorlite as tl\n", "import tensorlite as tl\nfrom tensorlite import hvp\n"),
])
def test_the_hvp_exercise_refuses_tl_hvp_and_puts_it_back(tmp_path, capsys, change):
    import tensorlite as tl

    original = tl.hvp
    text = (REFERENCES / "hessian_vector_product.py").read_text()
    assert change[0] in text
    (tmp_path / "hessian_vector_product.py").write_text(text.replace(*change))
    args = ["check", "hessian_vector_product", "--dir", str(tmp_path), "--examples", "5"]
    assert cli.main(args) == 1
    assert "which is the answer itself: write it with tl.grad, twice" in capsys.readouterr().out
    assert tl.hvp is original
    np.testing.assert_allclose(tl.hvp(lambda t: (t**3).sum(), [np.array([2.0])],
                                      [np.array([1.0])])[0].data, [12.0])
