"""docs/pictures.py redraws the pictures of docs/img/ from the project's own code: it runs as
a reader would run it, writes every picture the docs embed, and draws what to_dot says."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("docs_pictures", ROOT / "docs" / "pictures.py")
pictures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pictures)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_the_script_writes_every_picture(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "pictures.py"), "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(pictures.PICTURES)
    for name in pictures.PICTURES:
        w, h = png_size(tmp_path / name)
        assert w >= 400 and h >= 150
        committed = ROOT / "docs" / "img" / name
        assert committed.exists(), f"docs/img/{name} is not committed: run python docs/pictures.py"


def test_a_missing_out_dir_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "pictures.py"), "--out-dir",
                        str(tmp_path / "nope")], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "does not exist" in r.stderr


def test_the_script_draws_every_picture_in_docs_img():
    committed = {p.name for p in (ROOT / "docs" / "img").glob("*.png")}
    assert committed == set(pictures.PICTURES)


def test_the_attention_numbers_are_gpt_md_s_and_the_fused_op_s():
    ex = pictures.attention_example()  # asserts P v == F.causal_self_attention inside
    np.testing.assert_allclose(ex["P"][1], [0.196, 0.804, 0.0], atol=5e-4)
    assert np.isneginf(ex["masked"][0, 1]) and np.allclose(ex["P"].sum(axis=1), 1)


def test_the_backward_frames_follow_trace_backward():
    nodes, edges, frames = pictures.backward_frames()
    names = [f["step"].node.name for f in frames]
    assert names == ["L", "d", "e", "a", "b", "c", "f"]
    last = frames[-1]["grads"]
    label = {n: node["lines"][0] for n, node in nodes.items() if not node["op"]}
    assert {label[n]: g for n, g in last.items()} == {"'L'": 1.0, "'d'": -2.0, "'f'": 4.0,
                                                       "'e'": -2.0, "'c'": -2.0, "'a'": 6.0,
                                                       "'b'": -4.0}
    assert all(edge in edges for f in frames for edge in f["red"])


def test_the_heads_are_views_split_by_column_blocks():
    ex = pictures.heads_example(T=4, H=2, hd=3)
    assert (ex["heads"][1] == [3.0, 4.0, 5.0]).all() and (ex["joined"] == ex["q"]).all()


def test_every_picture_in_docs_img_is_embedded_somewhere():
    text = "".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    embedded = set(re.findall(r"!\[[^\]]*\]\((?:docs/)?img/([\w.-]+\.png)\)", text))
    assert {p.name for p in (ROOT / "docs" / "img").glob("*.png")} <= embedded


def test_parse_dot_reads_what_to_dot_wrote():
    nodes, edges = pictures.parse_dot(pictures.abcf_graph().to_dot())
    ops = sorted(n["lines"][0] for n in nodes.values() if n["op"])
    assert ops == ["Add", "Mul", "Mul"] and len(nodes) == 10 and len(edges) == 9
    leaves = {n["lines"][0]: n["lines"] for n in nodes.values() if n["leaf"]}
    assert sorted(leaves) == ["'a'", "'b'", "'c'", "'f'"]
    assert "data 2." in leaves["'a'"] and "grad 6." in leaves["'a'"]


def test_layout_puts_inputs_left_of_ops_and_ops_left_of_outputs():
    nodes, edges = pictures.parse_dot(pictures.diamond_graph().to_dot())
    pos = pictures.layout(nodes, edges)
    assert all(pos[s][0] < pos[d][0] for s, d in edges)
    assert len(set(pos.values())) == len(pos)  # no two nodes on one spot
