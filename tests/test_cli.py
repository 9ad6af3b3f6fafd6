"""The ``moerge`` command line: exit codes, the one-line error format, ``--debug``, ``--set``, ``--force``,
and the ``build`` / ``validate`` / ``inspect`` / ``generate`` commands.

Most cases call :func:`moerge.cli.main` in-process (with ``capsys``); one runs ``python -m moerge`` for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import moerge
from moerge.cli import main

REPO = Path(__file__).resolve().parents[1]
Pool = dict[str, Any]


def write_recipe(folder: Path, pool: Pool, name: str = "recipe.yaml", **extra: Any) -> Path:
    experts = [*pool["full"], *pool["lora"]]
    body = {"base": str(pool["base"]), "experts": [{"name": p.name, "source": str(p)} for p in experts], **extra}
    path = folder / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture
def recipe_file(tmp_path: Path, llama_pool: Pool) -> Path:
    """expert_0, expert_1 (full) and lora_0 over the llama base; task_arithmetic by default."""
    return write_recipe(tmp_path, llama_pool)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, llama_pool: Pool) -> Path:
    """One merged checkpoint for the read-only commands."""
    root = tmp_path_factory.mktemp("cli_built")
    return moerge.build(moerge.load_recipe(write_recipe(root, llama_pool)), root / "merged", progress=False)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.moerge-*"))


# ---------------------------------------------------------------------------------------------- build


def test_build_subprocess_loads_and_generates(tmp_path: Path, recipe_file: Path) -> None:
    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "moerge", "build", str(recipe_file), str(out), "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"wrote {out}\n"
    assert "Traceback" not in proc.stderr
    assert leftovers(out) == []
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok("The quick brown fox", return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > enc["input_ids"].shape[1]
    assert torch.isfinite(model(**enc).logits).all()


def test_build_in_process(tmp_path: Path, recipe_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "merged"
    assert main(["build", str(recipe_file), str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == (f"wrote {out}\n", "")
    assert (out / "model.safetensors").is_file() and leftovers(out) == []


# ---------------------------------------------------------------------------------------------- errors


def test_user_error_is_one_line_exit_2(tmp_path: Path, recipe_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["build", str(recipe_file), str(out), "--set", "merge.method=ties", "--set", "merge.density=2"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err == f"error: {recipe_file}: merge.density: density must be in (0, 1], got 2.0\n"
    assert captured.out == ""
    assert not out.exists() and leftovers(out) == []


def test_build_time_error_names_recipe_file(tmp_path: Path, recipe_file: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["build", str(recipe_file), str(tmp_path / "out"), "--set", "merge.density=0.5"])
    assert code == 2
    assert capsys.readouterr().err == (f"error: {recipe_file}: merge.density: 'density' is not a parameter of "
                                       "task_arithmetic (it takes: weights, lambda)\n")


def test_debug_shows_traceback(tmp_path: Path, recipe_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["build", "--debug", str(recipe_file), str(tmp_path / "out"), "--set", "merge.densty=0.5"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("Traceback (most recent call last):") and "RecipeError" in err
    assert err.splitlines()[-1].startswith(f"error: {recipe_file}: merge.densty: unknown key 'densty' "
                                           "(did you mean 'density'?)")


@pytest.mark.parametrize(("item", "field", "message"), [
    ("base.path=x", "base.path", "'base' is a str value, not a mapping"),
    ("experts.5.name=x", "experts.5.name", "'experts' is a list of 3 item(s); '5' is not an index in it"),
    ("experts.name=x", "experts.name", "'experts' is a list of 3 item(s); 'name' is not an index in it"),
    ("merge", "merge", "--set expects key.path=value"),
    ("merge.method=[ties", "merge.method", "--set value is not valid YAML"),
], ids=["into-a-string", "index-out-of-range", "key-into-a-list", "no-equals", "bad-yaml"])
def test_bad_set_is_a_user_error(recipe_file: Path, capsys: pytest.CaptureFixture[str], item: str, field: str,
                                 message: str) -> None:
    assert main(["validate", str(recipe_file), "--set", item]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {recipe_file}: {field}: {message}") and err.count("\n") == 1


def test_keyboard_interrupt_exit_130(tmp_path: Path, recipe_file: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from moerge.io.writer import ShardedWriter

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardedWriter, "write", interrupt)
    out = tmp_path / "out"
    assert main(["build", "--quiet", str(recipe_file), str(out)]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"
    assert not out.exists() and leftovers(out) == []


# ---------------------------------------------------------------------------------------------- --set


def test_set_overrides_match_the_python_api(tmp_path: Path, llama_pool: Pool, recipe_file: Path) -> None:
    ties_cli, ta_cli, ties_py = tmp_path / "ties_cli", tmp_path / "ta_cli", tmp_path / "ties_py"
    assert main(["build", "--quiet", str(recipe_file), str(ties_cli),
                 "--set", "merge.method=ties", "--set", "merge.density=0.5"]) == 0
    assert main(["build", "--quiet", str(recipe_file), str(ta_cli)]) == 0
    same = write_recipe(tmp_path, llama_pool, "ties.yaml", merge={"method": "ties", "density": 0.5})
    moerge.build(moerge.load_recipe(same), ties_py, progress=False)

    ties, ta, py = weights(ties_cli), weights(ta_cli), weights(ties_py)
    assert ties.keys() == ta.keys() == py.keys()
    assert all(torch.equal(ties[k], py[k]) for k in py)
    assert any(not torch.equal(ties[k], ta[k]) for k in ta)
    saved = yaml.safe_load((ties_cli / "moerge_recipe.yaml").read_text())
    assert saved["merge"]["method"] == "ties" and saved["merge"]["density"] == 0.5


# ---------------------------------------------------------------------------------------------- --force


def test_force(tmp_path: Path, recipe_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main(["build", "--quiet", str(recipe_file), str(out)]) == 2
    assert capsys.readouterr().err == (f"error: {out}: output folder exists and is not empty "
                                       "(use --force to replace it)\n")
    assert [p.name for p in out.iterdir()] == ["old.txt"]

    assert main(["build", "--quiet", "--force", str(recipe_file), str(out)]) == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(out) == []

    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty folder needs no --force
    assert main(["build", "--quiet", str(recipe_file), str(empty)]) == 0
    assert (empty / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- validate


def test_validate(tmp_path: Path, recipe_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(recipe_file)]) == 0
    assert capsys.readouterr().out == f"{recipe_file}: ok (3 experts, merge task_arithmetic)\n"

    assert main(["validate", str(recipe_file), "--set", "merge.method=tiess"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {recipe_file}: merge.method: unknown merge method 'tiess' (did you mean 'ties'?)")
    assert err.count("\n") == 1

    ghost = tmp_path / "ghost"
    assert main(["validate", str(recipe_file), "--set", f"experts.1.source={ghost}"]) == 2
    assert capsys.readouterr().err == f"error: {ghost}: expert 'expert_1' path not found\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # validate writes nothing


# ---------------------------------------------------------------------------------------------- inspect, generate


def test_inspect_prints_tensor_count(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(built)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"{built}: model_type llama, {len(weights(built))} tensors, ")


def test_inspect_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope' / 'config.json'}: file not found\n"


def test_generate_prints_text(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(built), "Review:", "good", "movie", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out

    model = AutoModelForCausalLM.from_pretrained(built).eval()
    tok = AutoTokenizer.from_pretrained(built)
    enc = tok(["Review: good movie"], return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert expected.strip() and printed == f"{expected}\n"
