"""The bad-input catalogue: every user mistake gives one exact ``<file>: <field>: <message>`` error and leaves
nothing behind (no output folder, no ``.<name>.moerge-tmp-*`` folder beside it).

Each case writes a recipe into ``tmp_path`` and runs ``moerge.build(moerge.load_recipe(path), out)``.  Broken
experts are copies of the session pool's experts, edited; experts of another shape come from ``make_base``
once per module (:func:`others`).

The second half (issue 12) runs the CLI in-process (:func:`cli_fails`): each case asserts the exact one-line
message, exit status 2, and that every input and any existing output is byte-identical afterwards.  Cases that
could destroy inputs work on a private copy of the pool (:func:`own_pool`).  Faults (SIGTERM, SIGKILL at random
points) run ``python -m moerge`` in a subprocess slowed by ``MOERGE_TEST_DELAY_PER_TENSOR``; unreadable files
are made by dropping the thread's CAP_DAC_OVERRIDE when the tests run as root (:func:`unprivileged`); a
hypothesis property test mutates a valid recipe and accepts only a clean run or one ``error:`` line.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import importlib
import io
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

import moerge
from moerge.cli import main
from moerge.errors import CheckpointError, NotSupportedError, OutputError, RecipeError, SourceError
from moerge.io.atomic import output_lock
from moerge.io.writer import ShardedWriter
from moerge.merge.methods import METHODS
from moerge.recipe import ExpertSpec, MergeSpec, Recipe
from moerge.testing.tiny import make_base, make_lora_expert

Pool = dict[str, Any]


# ---------------------------------------------------------------------------------------------- helpers


def leftovers(out: Path) -> list[Path]:
    """Temporary / old folders a build may leave beside ``out``."""
    return sorted(out.parent.glob(f".{out.name}.moerge-*"))


def assert_clean(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    assert leftovers(out) == []


def recipe(pool: Pool, *experts: Path, **extra: Any) -> dict[str, Any]:
    """A recipe over ``pool``'s base; each expert is named after its folder."""
    return {"base": str(pool["base"]), "experts": [{"name": p.name, "source": str(p)} for p in experts], **extra}


def write_recipe(tmp_path: Path, body: dict[str, Any], name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def fails(tmp_path: Path, body: dict[str, Any], exc_type: type[Exception], message: str) -> Path:
    """Build ``body``; assert the exact error and that nothing is left. Returns the recipe path."""
    path = write_recipe(tmp_path, body)
    out = tmp_path / "out"
    with pytest.raises(exc_type) as info:
        moerge.build(moerge.load_recipe(path), out, progress=False)
    assert str(info.value) == message
    assert_clean(out)
    return path


def copy_expert(pool: Pool, tmp_path: Path, name: str, src: Path | None = None) -> Path:
    dst = tmp_path / name
    shutil.copytree(src or pool["full"][0], dst)
    return dst


def edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Rewrite ``folder/model.safetensors`` after ``edit`` changed its tensors in place."""
    f = folder / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})
    return f


def edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def valid_keys(model: type[BaseModel]) -> str:
    return ", ".join(sorted(f.alias or n for n, f in model.model_fields.items()))


@pytest.fixture
def pool(llama_pool: Pool) -> Pool:
    return llama_pool


@pytest.fixture(scope="module")
def others(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny checkpoints that do not match the llama pool's base (hidden 32, 2 layers, vocab 512)."""
    root = tmp_path_factory.mktemp("other_bases")
    out = {
        "model_type": make_base(root / "qwen2", family="qwen2"),
        "hidden_size": make_base(root / "hidden48", hidden=48),
        "num_hidden_layers": make_base(root / "layers3", layers=3),
        "vocab_size": make_base(root / "vocab600", vocab=600),
    }
    out["lora_hidden48"] = make_lora_expert(out["hidden_size"], root / "lora_hidden48", seed=7)
    out["lora_layers3"] = make_lora_expert(out["num_hidden_layers"], root / "lora_layers3", seed=8)
    return out


@pytest.fixture
def count_writes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record the folder of every tensor the writer streams (to prove a build got halfway)."""
    written: list[Path] = []
    original = ShardedWriter.write

    def write(self: ShardedWriter, name: str, tensor: torch.Tensor) -> None:
        written.append(self.folder)
        original(self, name, tensor)

    monkeypatch.setattr(ShardedWriter, "write", write)
    return written


# ---------------------------------------------------------------------------------------------- paths


def test_missing_base_path(tmp_path: Path, pool: Pool) -> None:
    body = recipe(pool, pool["full"][0])
    body["base"] = "no_such_base"  # relative: resolved against the recipe's folder
    fails(tmp_path, body, CheckpointError, f"{(tmp_path / 'no_such_base').resolve()}: base path not found")


def test_missing_expert_path(tmp_path: Path, pool: Pool) -> None:
    ghost = tmp_path / "ghost"
    fails(tmp_path, recipe(pool, pool["full"][0], ghost), SourceError, f"{ghost}: expert 'ghost' path not found")


# ---------------------------------------------------------------------------------------------- config mismatch


@pytest.mark.parametrize(("key", "message"), [
    ("model_type", "model_type: does not match the base ('qwen2' vs 'llama')"),
    ("hidden_size", "hidden_size: does not match the base (48 vs 32)"),
    ("num_hidden_layers", "num_hidden_layers: does not match the base (3 vs 2)"),
    ("vocab_size", "vocab_size: does not match the base (600 vs 512)"),
], ids=["model_type", "hidden_size", "num_hidden_layers", "vocab_size"])
def test_full_expert_config_mismatch(tmp_path: Path, pool: Pool, others: dict[str, Path], key: str,
                                     message: str) -> None:
    expert = others[key]
    fails(tmp_path, recipe(pool, expert), CheckpointError, f"{expert / 'config.json'}: {message}")


def test_full_expert_other_architecture(tmp_path: Path, pool: Pool) -> None:
    expert = copy_expert(pool, tmp_path, "classifier")
    edit_json(expert / "config.json", architectures=["LlamaForSequenceClassification"])
    fails(tmp_path, recipe(pool, expert), CheckpointError,
          f"{expert / 'config.json'}: architectures: does not match the base "
          "(['LlamaForSequenceClassification'] vs ['LlamaForCausalLM'])")


# ---------------------------------------------------------------------------------------------- tensors


def test_tensor_missing_in_expert(tmp_path: Path, pool: Pool) -> None:
    expert = copy_expert(pool, tmp_path, "no_up_proj")
    edit_tensors(expert, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    fails(tmp_path, recipe(pool, pool["full"][1], expert), SourceError,
          f"{expert}: model.layers.1.mlp.up_proj.weight: tensor missing in expert 'no_up_proj'")


def test_tensor_shape_mismatch(tmp_path: Path, pool: Pool) -> None:
    expert = copy_expert(pool, tmp_path, "narrow_q")
    f = edit_tensors(expert, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(16, 32)}))
    fails(tmp_path, recipe(pool, expert), SourceError,
          f"{f}: model.layers.0.self_attn.q_proj.weight: shape [16, 32] does not match the base's [32, 32]")


def test_truncated_safetensors(tmp_path: Path, pool: Pool) -> None:
    expert = copy_expert(pool, tmp_path, "truncated")
    f = expert / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    data_len = (len(raw) - 8 - n) // 2
    f.write_bytes(raw[:8 + n + data_len])  # cut in the middle of the data
    header = json.loads(raw[8:8 + n])
    name, meta = next((k, v) for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] > data_len)
    start, end = meta["data_offsets"]
    fails(tmp_path, recipe(pool, expert), CheckpointError,
          f"{f}: {name}: truncated or corrupt safetensors file "
          f"(tensor bytes {start}..{end} but {data_len} data bytes in the file)")


@pytest.mark.parametrize(("where", "detail"), [
    ("length", "header length 18446744073709551615 exceeds the file size {size}"),
    ("json", "Expecting value: line 1 column 1 (char 0)"),
], ids=["length", "json"])
def test_corrupt_safetensors_header(tmp_path: Path, pool: Pool, where: str, detail: str) -> None:
    expert = copy_expert(pool, tmp_path, "corrupt")
    f = expert / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(b"\xff" * 8 + raw[8:] if where == "length" else raw[:8] + b"#garbage#garbage" + raw[24:])
    fails(tmp_path, recipe(pool, expert), CheckpointError,
          f"{f}: truncated or corrupt safetensors file ({detail.format(size=len(raw))})")


@pytest.mark.parametrize(("tensor", "values", "count"), [
    ("model.layers.1.mlp.down_proj.weight", [float("nan")], 1),
    ("model.norm.weight", [float("inf"), float("-inf")], 2),
], ids=["nan", "inf"])
def test_nan_inf_found_while_building(tmp_path: Path, pool: Pool, count_writes: list[Path], tensor: str,
                                      values: list[float], count: int) -> None:
    expert = copy_expert(pool, tmp_path, "poisoned")

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[tensor].view(-1)[: len(values)] = torch.tensor(values)

    f = edit_tensors(expert, poison)
    fails(tmp_path, recipe(pool, pool["full"][1], expert), CheckpointError, f"{f}: {tensor}: {count} NaN/Inf values")
    assert count_writes, "the bad tensor should only be found after some output was written"
    assert not count_writes[0].exists()  # the partial output folder is gone


# ---------------------------------------------------------------------------------------------- merge settings


def test_unknown_merge_method(tmp_path: Path, pool: Pool) -> None:
    path = tmp_path / "recipe.yaml"
    fails(tmp_path, recipe(pool, *pool["full"], merge={"method": "tiess"}), RecipeError,
          f"{path}: merge.method: unknown merge method 'tiess' (did you mean 'ties'?); "
          f"one of: {', '.join(sorted(METHODS.names()))}")


@pytest.mark.parametrize(("density", "shown"), [(0, "0.0"), (-0.1, "-0.1"), (1.5, "1.5")],
                         ids=["0", "-0.1", "1.5"])
def test_density_out_of_range(tmp_path: Path, pool: Pool, density: float, shown: str) -> None:
    path = tmp_path / "recipe.yaml"
    fails(tmp_path, recipe(pool, *pool["full"], merge={"method": "ties", "density": density}), RecipeError,
          f"{path}: merge.density: density must be in (0, 1], got {shown}")


def test_parameter_the_method_does_not_take(tmp_path: Path, pool: Pool) -> None:
    path = tmp_path / "recipe.yaml"
    fails(tmp_path, recipe(pool, *pool["full"], merge={"method": "task_arithmetic", "density": 0.5}), RecipeError,
          f"{path}: merge.density: 'density' is not a parameter of task_arithmetic (it takes: weights, lambda)")


@pytest.mark.parametrize(("merge", "field", "shown"), [
    ({"density": 0.9, "epsilon": 0.2}, "merge.epsilon", "density 0.9, epsilon 0.2"),
    ({"density": 0.5, "epsilon": 0.5}, "merge.epsilon", "density 0.5, epsilon 0.5"),
    ({"density": 0.9}, "merge.density", "density 0.9, epsilon 0.15"),  # the default epsilon: blame density
], ids=["sum-above-1", "sum-equals-1", "default-epsilon"])
def test_della_density_plus_epsilon(tmp_path: Path, pool: Pool, merge: dict[str, float], field: str,
                                    shown: str) -> None:
    path = tmp_path / "recipe.yaml"
    fails(tmp_path, recipe(pool, *pool["full"], merge={"method": "della", **merge}), RecipeError,
          f"{path}: {field}: density +- epsilon must stay inside (0, 1) ({shown})")


# ---------------------------------------------------------------------------------------------- recipe shape


def test_duplicate_expert_names(tmp_path: Path, pool: Pool) -> None:
    body = recipe(pool, *pool["full"], pool["lora"][0])
    body["experts"][2]["name"] = body["experts"][0]["name"]
    fails(tmp_path, body, RecipeError,
          f"{tmp_path / 'recipe.yaml'}: experts[2].name: duplicate expert name 'expert_0' (also used by experts[0])")


def test_zero_experts(tmp_path: Path, pool: Pool) -> None:
    fails(tmp_path, recipe(pool), RecipeError,
          f"{tmp_path / 'recipe.yaml'}: experts: a recipe needs at least one expert, got none")
    fails(tmp_path, {"base": str(pool["base"])}, RecipeError,
          f"{tmp_path / 'recipe.yaml'}: experts: required key is missing")


@pytest.mark.parametrize(("edit", "field", "hint", "model"), [
    (lambda r: r["merge"].update(densty=0.5), "merge.densty", "density", MergeSpec),
    (lambda r: r["experts"][0].update(sorce=r["experts"][0].pop("source")), "experts[0].sorce", "source",
     ExpertSpec),
    (lambda r: r.update(expertz=r.pop("experts")), "expertz", "experts", Recipe),
], ids=["merge.densty", "experts[0].sorce", "expertz"])
def test_unknown_recipe_keys(tmp_path: Path, pool: Pool, edit: Callable[[dict[str, Any]], None], field: str,
                             hint: str, model: type[BaseModel]) -> None:
    body = recipe(pool, *pool["full"], merge={"method": "ties"})
    edit(body)
    key = field.rsplit(".", 1)[-1]
    fails(tmp_path, body, RecipeError,
          f"{tmp_path / 'recipe.yaml'}: {field}: unknown key '{key}' (did you mean '{hint}'?); "
          f"valid keys: {valid_keys(model)}")


# ---------------------------------------------------------------------------------------------- sources


@pytest.mark.parametrize(("other", "message"), [
    ("lora_hidden48", ("{a}: model.layers.0.mlp.down_proj.weight: LoRA adapter for a different base: "
                       "lora_A [4, 96] / lora_B [48, 4] do not fit the base weight [32, 64]")),
    ("lora_layers3", ("{d}: model.layers.2.mlp.down_proj.weight: LoRA adapter for a different base: "
                      "module not in the base model {base}")),
], ids=["hidden48", "layers3"])
def test_lora_adapter_for_another_base(tmp_path: Path, pool: Pool, others: dict[str, Path], other: str,
                                       message: str) -> None:
    adapter = others[other]
    fails(tmp_path, recipe(pool, pool["full"][0], adapter), SourceError,
          message.format(a=adapter / "adapter_model.safetensors", d=adapter, base=pool["base"]))


def test_dora_adapter_not_supported(tmp_path: Path, pool: Pool) -> None:
    adapter = copy_expert(pool, tmp_path, "dora", src=pool["lora"][0])
    edit_json(adapter / "adapter_config.json", use_dora=True)
    fails(tmp_path, recipe(pool, adapter), NotSupportedError,
          f"{adapter / 'adapter_config.json'}: use_dora: DoRA adapters are not supported yet")


def test_pickle_expert_needs_allow_pickle(tmp_path: Path, pool: Pool) -> None:
    expert = copy_expert(pool, tmp_path, "pickled")
    (expert / "model.safetensors").unlink()
    torch.save(load_file(pool["full"][0] / "model.safetensors"), expert / "pytorch_model.bin")
    fails(tmp_path, recipe(pool, expert), CheckpointError,
          f"{expert / 'pytorch_model.bin'}: refusing to unpickle a .bin checkpoint; convert it to safetensors or "
          "pass --allow-pickle (loads with weights_only=True)")
    # allowed, it merges exactly like the safetensors original
    allowed = moerge.build(moerge.load_recipe(write_recipe(tmp_path, recipe(pool, expert, allow_pickle=True))),
                           tmp_path / "allowed", progress=False)
    reference = moerge.build(moerge.load_recipe(write_recipe(tmp_path, recipe(pool, pool["full"][0]), "ref.yaml")),
                             tmp_path / "reference", progress=False)
    got, want = load_file(allowed / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------------- output folder


def test_output_folder_not_empty_and_force(tmp_path: Path, pool: Pool) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    path = write_recipe(tmp_path, recipe(pool, *pool["full"]))
    with pytest.raises(OutputError) as info:
        moerge.build(moerge.load_recipe(path), out, progress=False)
    assert str(info.value) == f"{out}: output folder exists and is not empty (use --force to replace it)"
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and leftovers(out) == []

    moerge.build(moerge.load_recipe(path), out, force=True, progress=False)
    names = {p.name for p in out.iterdir()}
    assert "keep.txt" not in names and {"model.safetensors", "config.json", "moerge_recipe.yaml"} <= names
    assert leftovers(out) == []


def test_output_path_is_a_file(tmp_path: Path, pool: Pool) -> None:
    out = tmp_path / "out"
    out.write_text("not a folder")
    path = write_recipe(tmp_path, recipe(pool, *pool["full"]))
    for force in (False, True):
        with pytest.raises(OutputError) as info:
            moerge.build(moerge.load_recipe(path), out, force=force, progress=False)
        assert str(info.value) == f"{out}: output path exists and is not a folder"
        assert out.read_text() == "not a folder" and leftovers(out) == []


# ---------------------------------------------------------------------------------------------- interrupts


@pytest.fixture
def interrupt_halfway(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Make the writer raise KeyboardInterrupt on the 5th tensor; records the temp folder it wrote into."""
    seen: list[Path] = []
    original = ShardedWriter.write

    def write(self: ShardedWriter, name: str, tensor: torch.Tensor) -> None:
        seen.append(self.folder)
        if len(seen) == 5:
            assert self.folder.is_dir() and any(self.folder.iterdir())  # really halfway through a shard
            raise KeyboardInterrupt
        original(self, name, tensor)

    monkeypatch.setattr(ShardedWriter, "write", write)
    return seen


def test_interrupt_leaves_nothing(tmp_path: Path, pool: Pool, interrupt_halfway: list[Path]) -> None:
    out = tmp_path / "out"
    path = write_recipe(tmp_path, recipe(pool, *pool["full"], pool["lora"][0]))
    with pytest.raises(KeyboardInterrupt):
        moerge.build(moerge.load_recipe(path), out, progress=False)
    assert len(interrupt_halfway) == 5 and interrupt_halfway[0].name.startswith(".out.moerge-tmp-")
    assert_clean(out)


def test_interrupt_with_force_keeps_the_old_folder(tmp_path: Path, pool: Pool, interrupt_halfway: list[Path]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous build")
    path = write_recipe(tmp_path, recipe(pool, *pool["full"]))
    with pytest.raises(KeyboardInterrupt):
        moerge.build(moerge.load_recipe(path), out, force=True, progress=False)
    assert len(interrupt_halfway) == 5
    assert [p.name for p in out.iterdir()] == ["old.txt"] and (out / "old.txt").read_text() == "previous build"
    assert leftovers(out) == []


# ================================================================================ issue 12: helpers

REPO = Path(__file__).resolve().parents[1]
HOLDS = "moerge never writes over its inputs"


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file (sha256) and folder under ``roots``: what "byte-identical afterwards" compares."""
    out: dict[str, str] = {}
    for root in roots:
        if root.is_symlink():
            out[str(root)] = f"link -> {os.readlink(root)}"
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
        elif root.is_dir():
            out[str(root)] = "dir"
            for p in sorted(root.rglob("*")):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        elif not root.is_symlink():
            out[str(root)] = "absent"
    return out


def cli(*argv: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def cli_fails(argv: list[str | Path], message: str, *keep: Path) -> None:
    """``moerge ARGV`` exits 2 with exactly ``error: MESSAGE`` and leaves ``keep`` byte-identical."""
    before = snapshot(*keep)
    code, _, err = cli(*argv)
    assert (code, err) == (2, f"error: {message}\n")
    assert snapshot(*keep) == before


@pytest.fixture
def own_pool(tmp_path: Path, pool: Pool) -> dict[str, Path]:
    """A private copy of base, expert_0, lora_0 and their data, with a recipe using relative paths inside it."""
    root = tmp_path / "pool"
    for name in ("base", "expert_0", "lora_0"):
        shutil.copytree(pool["experts"].get(name, pool["base"]), root / name)
    shutil.copytree(pool["data"]["sentiment"].parent, root / "data")
    body = {"base": "base", "experts": [
        {"name": "expert_0", "source": "expert_0", "calibration": {"data": "data/sentiment.jsonl"}},
        {"name": "lora_0", "source": "lora_0", "calibration": {"data": "data/math.jsonl"}}]}
    (root / "recipe.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    return {"root": root, "recipe": root / "recipe.yaml", "base": root / "base", "expert": root / "expert_0",
            "lora": root / "lora_0", "data": root / "data"}


def routed_recipe(pool: Pool, tmp_path: Path, name: str = "recipe.yaml", **routing: Any) -> Path:
    """expert_0 (full) + lora_0 behind a sequence router initialised from calibration data (chat-templated)."""
    body = recipe(pool, pool["full"][0], pool["lora"][0], routing={"expert": {"kind": "dense"}, **routing})
    body["experts"][0]["calibration"] = {"data": str(pool["data"]["sentiment"]), "chat_template": True}
    body["experts"][1]["calibration"] = {"data": str(pool["data"]["math"])}
    return write_recipe(tmp_path, body, name)


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory, llama_pool: Pool) -> Path:
    """One routed checkpoint with dense MLP experts (for export / calibrate / generate)."""
    root = tmp_path_factory.mktemp("issue12_moe")
    return moerge.build(moerge.load_recipe(routed_recipe(llama_pool, root)), root / "moe", progress=False)


def inputs_of(pool: Pool) -> list[Path]:
    return [pool["base"], *pool["full"], *pool["lora"], pool["data"]["sentiment"].parent]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@contextmanager
def unprivileged() -> Iterator[None]:
    """File permissions apply to this thread: as root, drop CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH for the block
    (capabilities are per thread on Linux); as another user they apply anyway."""
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        pytest.skip("cannot read capabilities")
    effective = data[0].effective
    data[0].effective = effective & ~0b110
    if libc.capset(ctypes.byref(header), data) != 0:
        pytest.skip("cannot drop CAP_DAC_OVERRIDE")
    try:
        yield
    finally:
        data[0].effective = effective
        libc.capset(ctypes.byref(header), data)


# ================================================================================ 1. inputs are never outputs


def test_force_onto_the_pool_folder_keeps_every_input(own_pool: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    root = own_pool["root"]
    monkeypatch.chdir(root)
    cli_fails(["build", "recipe.yaml", ".", "--force", "--quiet"],
              f"{root}: output folder contains an input of this run (recipe: {own_pool['recipe']}); {HOLDS}", root)


def test_force_onto_an_expert_folder(own_pool: dict[str, Path]) -> None:
    expert = own_pool["expert"]
    cli_fails(["build", own_pool["recipe"], expert, "--force", "--quiet"],
              f"{expert}: output folder is an input of this run (expert 'expert_0': {expert}); {HOLDS}",
              own_pool["root"])


def test_output_inside_an_input_folder(own_pool: dict[str, Path]) -> None:
    out = own_pool["base"] / "merged"
    cli_fails(["build", own_pool["recipe"], out, "--quiet"],
              f"{out}: output folder lies inside an input of this run (base: {own_pool['base']}); {HOLDS}",
              own_pool["root"])


def test_output_symlink_to_an_input(own_pool: dict[str, Path], tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(own_pool["lora"])
    cli_fails(["build", own_pool["recipe"], link, "--force", "--quiet"],
              f"{link}: output folder is an input of this run (expert 'lora_0': {own_pool['lora']}); {HOLDS}",
              own_pool["root"], link)


def test_output_folder_holding_the_calibration_data(own_pool: dict[str, Path]) -> None:
    data = own_pool["data"]
    cli_fails(["build", own_pool["recipe"], data, "--force", "--quiet"],
              f"{data}: output folder contains an input of this run (calibration data of 'expert_0': "
              f"{data / 'sentiment.jsonl'}); {HOLDS}", own_pool["root"])


def test_export_onto_its_own_source(moe: Path) -> None:
    cli_fails(["export", moe, "--to", "mixtral", moe, "--force", "--quiet"],
              f"{moe}: output folder is an input of this run (source checkpoint: {moe}); {HOLDS}", moe)


def test_calibrate_out_inside_the_checkpoint(moe: Path, pool: Pool) -> None:
    out = moe / "calibrated"
    cli_fails(["calibrate", moe, "--data", pool["data"]["math"], "--out", out, "--quiet"],
              f"{out}: output folder lies inside an input of this run (checkpoint: {moe}); {HOLDS}", moe)


def test_analyze_out_onto_the_base(tmp_path: Path, pool: Pool) -> None:
    path = write_recipe(tmp_path, recipe(pool, *pool["full"]))
    cli_fails(["analyze", path, "--out", pool["base"], "--quiet"],
              f"{pool['base']}: output folder is an input of this run (base: {pool['base']}); {HOLDS}",
              *inputs_of(pool))


# ================================================================================ 2. no broken model with exit 0


def test_int8_quantized_expert(tmp_path: Path, pool: Pool) -> None:
    expert = copy_expert(pool, tmp_path, "int8")
    f = edit_tensors(expert, lambda t: t.update({k: (v * 127).round().to(torch.int8) for k, v in t.items()}))
    path = write_recipe(tmp_path, recipe(pool, expert))
    cli_fails(["build", path, tmp_path / "out", "--quiet"],
              f"{f}: lm_head.weight: stored as I8 where the base has F32: an integer or quantized tensor cannot be "
              "merged as numbers (dequantize the checkpoint to float first)", expert, *inputs_of(pool))
    assert_clean(tmp_path / "out")


def test_int_relabelled_expert(tmp_path: Path, pool: Pool) -> None:
    """Same bytes, the header's dtype says I32: read as numbers the weights would be ~1e9."""
    expert = copy_expert(pool, tmp_path, "relabelled")
    f = expert / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].replace(b'"dtype":"F32"', b'"dtype":"I32"', 1)
    name = next(k for k, v in json.loads(header).items() if k != "__metadata__" and v["dtype"] == "I32")
    f.write_bytes(raw[:8] + header + raw[8 + n:])
    fails(tmp_path, recipe(pool, expert), SourceError,
          f"{f}: {name}: stored as I32 where the base has F32: an integer or quantized tensor cannot be merged as "
          "numbers (dequantize the checkpoint to float first)")


def test_quantization_config(tmp_path: Path, pool: Pool) -> None:
    expert = copy_expert(pool, tmp_path, "bnb")
    edit_json(expert / "config.json", quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})
    fails(tmp_path, recipe(pool, expert), CheckpointError,
          f"{expert / 'config.json'}: quantization_config: quantized checkpoint (bitsandbytes): its weights cannot "
          "be merged as numbers; dequantize it to float first")


def test_base_config_dtype_not_float(tmp_path: Path, pool: Pool) -> None:
    base = copy_expert(pool, tmp_path, "base_int", src=pool["base"])
    edit_json(base / "config.json", dtype="int8")
    body = recipe(pool, *pool["full"])
    body["base"] = str(base)
    fails(tmp_path, body, CheckpointError,
          f"{base / 'config.json'}: dtype: 'int8' is not a float dtype (float32, float16, bfloat16 or float64)")


def test_linear_weights_summing_to_zero(tmp_path: Path, pool: Pool) -> None:
    body = recipe(pool, *pool["full"], merge={"method": "linear", "weights": {"expert_0": 1.0, "expert_1": -1.0}})
    path = write_recipe(tmp_path, body)
    cli_fails(["validate", path], f"{path}: merge.weights: the weights of a linear merge sum to 0 (1.0, -1.0); the "
                                  "average of the experts is undefined (use task_arithmetic for differences)", path)


def test_export_experts_per_token_negative(moe: Path, tmp_path: Path) -> None:
    out = tmp_path / "mixtral"
    cli_fails(["export", moe, "--to", "mixtral", out, "--experts-per-token", "-3"],
              "--experts-per-token: must be an integer >= 1, got '-3' (see moerge export --help)", moe, out)
    with pytest.raises(RecipeError) as info:  # the API too
        moerge.export.export_checkpoint(moe, "mixtral", out, experts_per_token=0, progress=False)
    assert str(info.value) == "--experts-per-token: must be an integer >= 1, got 0"
    assert_clean(out)


@pytest.mark.parametrize(("key", "value", "shown"), [
    ("merge.lambda", ".nan", "nan"), ("merge.weights.expert_0", ".inf", "inf"),
    ("routing.select.threshold", ".nan", "nan"), ("routing.router.scale", "-.inf", "-inf"),
    ("merge.gamma", ".nan", "nan"),
], ids=["lambda-nan", "weight-inf", "threshold-nan", "scale-inf", "gamma-nan"])
def test_nan_inf_in_the_recipe(tmp_path: Path, pool: Pool, key: str, value: str, shown: str) -> None:
    path = routed_recipe(pool, tmp_path)
    cli_fails(["validate", path, "--set", f"{key}={value}"], f"{path}: {key}: must be a finite number, got {shown}",
              path)


@pytest.mark.parametrize(("value", "message"), [
    ("0", "Input should be greater than 0, got 0"),
    ("3", "top_k 3 is more than the 2 experts"),
], ids=["zero", "more-than-experts"])
def test_router_top_k(tmp_path: Path, pool: Pool, value: str, message: str) -> None:
    path = routed_recipe(pool, tmp_path)
    cli_fails(["validate", path, "--set", f"routing.router.top_k={value}"], f"{path}: routing.router.top_k: {message}",
              path)


def test_unknown_dtype_in_a_header(tmp_path: Path, pool: Pool) -> None:
    expert = copy_expert(pool, tmp_path, "f4")
    f = expert / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].replace(b'"dtype":"F32"', b'"dtype":"X32"', 1)
    name = next(k for k, v in json.loads(header).items() if k != "__metadata__" and v["dtype"] == "X32")
    f.write_bytes(raw[:8] + header + raw[8 + n:])
    fails(tmp_path, recipe(pool, expert), CheckpointError,
          f"{f}: {name}: unknown or unsupported dtype 'X32' in the safetensors header")


# ================================================================================ 3. fail before the long work


def bad_data(tmp_path: Path, pool: Pool, case: str) -> tuple[list[str], str]:
    """``--set`` items that break expert 0's calibration source, and the message (file: field: what)."""
    f = tmp_path / f"{case}.jsonl"
    if case == "missing":
        return [f"experts.0.calibration.data={f}"], f"{f}: calibration data file not found"
    if case == "empty":
        f.write_text("")
        return [f"experts.0.calibration.data={f}"], f"{f}: prompt: calibration source is empty"
    if case == "not-utf8":
        f.write_bytes(b'{"prompt": "caf\\xe9"}\n'.replace(b"\\xe9", b"\xe9"))
        return [f"experts.0.calibration.data={f}"], f"{f}: not UTF-8 text (byte 0xe9 at offset 15)"
    if case == "wrong-field":
        return ["experts.0.calibration.field=text"], f"{pool['data']['sentiment']}: text: no such field; columns: prompt, task"
    base = copy_expert(pool, tmp_path, "base_no_template", src=pool["base"])
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    for t in base.glob("chat_template*"):
        t.unlink()
    return [f"base={base}"], (f"{pool['data']['sentiment']}: chat_template: chat template requested but the "
                              "tokenizer has no chat template")


@pytest.mark.parametrize("case", ["missing", "empty", "not-utf8", "wrong-field", "no-chat-template"])
def test_bad_calibration_data_before_any_tensor(tmp_path: Path, pool: Pool, count_writes: list[Path],
                                                case: str) -> None:
    path = routed_recipe(pool, tmp_path)
    items, message = bad_data(tmp_path, pool, case)
    sets = [a for item in items for a in ("--set", item)]
    cli_fails(["validate", path, *sets], message, path, *inputs_of(pool))
    cli_fails(["build", path, tmp_path / "out", "--quiet", *sets], message, path, *inputs_of(pool))
    assert count_writes == [], "the data must be read before the first tensor is written"
    assert_clean(tmp_path / "out")


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"r": 0}, "r", "must be a positive integer (the LoRA rank), got 0"),
    ({"lora_alpha": "sixteen"}, "lora_alpha", "must be a finite number, got 'sixteen'"),
    ({"r": 3}, None, "lora_A has rank 4 but adapter_config.json gives r 3 for this module"),
], ids=["r-0", "alpha-text", "r-disagrees"])
def test_lora_config_numbers(tmp_path: Path, pool: Pool, count_writes: list[Path], change: dict[str, Any],
                             field: str | None, message: str) -> None:
    adapter = copy_expert(pool, tmp_path, "lora_bad", src=pool["lora"][0])
    edit_json(adapter / "adapter_config.json", **change)
    path = write_recipe(tmp_path, recipe(pool, pool["full"][0], adapter))
    if field is None:  # the tensor names the module: the first adapted one
        first = next(n for n in load_file(adapter / "adapter_model.safetensors") if "lora_A" in n)
        module = first.removeprefix("base_model.model.").replace(".lora_A", "").replace(".default", "")
        shown = f"{adapter / 'adapter_model.safetensors'}: {module}: {message}"
    else:
        shown = f"{adapter / 'adapter_config.json'}: {field}: {message}"
    cli_fails(["validate", path], shown, adapter, path)
    cli_fails(["build", path, tmp_path / "out", "--quiet"], shown, adapter, path)
    assert count_writes == []
    assert_clean(tmp_path / "out")


@pytest.mark.parametrize(("budget", "message"), [
    ("lots", "budget 'lots' must look like 1.3x"),
    ("0.5x", "budget 0.5x is below the base model's size (1.0x)"),
    ("nanx", "budget 'nanx' must be a finite multiple of the base's size, like 1.3x"),
], ids=["text", "below-1", "nan"])
def test_garbage_budget_at_load(tmp_path: Path, pool: Pool, budget: str, message: str) -> None:
    path = routed_recipe(pool, tmp_path)
    cli_fails(["validate", path, "--set", f"routing.select.budget={budget}"], f"{path}: routing.select.budget: {message}",
              path)


def test_validate_computes_no_tensor(tmp_path: Path, pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """validate opens and reads everything but never merges, never writes (and says ok)."""
    import moerge.pipeline.context

    def forbidden(*_: object, **__: object) -> None:
        raise AssertionError("validate computed a tensor")

    monkeypatch.setattr(moerge.pipeline.context, "merge_tensor", forbidden)
    monkeypatch.setattr(ShardedWriter, "__init__", forbidden)
    path = routed_recipe(pool, tmp_path)
    assert cli("validate", path) == (0, f"{path}: ok (2 experts, merge task_arithmetic, routed)\n", "")


# ================================================================================ 4. leftovers and signals


def _subprocess_build(path: Path, out: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "MOERGE_WORKERS": "1", "MOERGE_TEST_DELAY_PER_TENSOR": "0.05"}
    return subprocess.Popen([sys.executable, "-m", "moerge", "build", str(path), str(out), "--quiet"], cwd=path.parent,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_temp(proc: subprocess.Popen[str], out: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(p.name.startswith(f".{out.name}.moerge-tmp-") for p in leftovers(out)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the build never started writing"
        time.sleep(0.01)


def test_sigterm_cleans_up_like_ctrl_c(tmp_path: Path, pool: Pool) -> None:
    path, out = write_recipe(tmp_path, recipe(pool, *pool["full"])), tmp_path / "out"
    proc = _subprocess_build(path, out)
    _wait_for_temp(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode, err) == (143, "error: interrupted (SIGTERM)\n")
    assert_clean(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_point_then_rebuild(tmp_path: Path, pool: Pool, seed: int) -> None:
    """kill -9 mid-write leaves a temp folder (nothing can stop that) but never an output; the next build to the
    same path succeeds and removes the dead build's temp folder."""
    path, out = write_recipe(tmp_path, recipe(pool, *pool["full"], pool["lora"][0])), tmp_path / "out"
    proc = _subprocess_build(path, out)
    _wait_for_temp(proc, out)
    time.sleep(random.Random(seed).uniform(0.0, 0.8))  # ~25 tensors x 0.05 s of writing
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    moerge.build(moerge.load_recipe(path), out, progress=False)
    assert (out / "model.safetensors").is_file() and leftovers(out) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_folders_of_dead_processes_are_removed(tmp_path: Path, pool: Pool) -> None:
    out = tmp_path / "out"
    stale = tmp_path / f".out.moerge-tmp-{_dead_pid()}-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".out.moerge-lock").write_text("12345\n")  # the dead build's lock file, no longer held
    moerge.build(moerge.load_recipe(write_recipe(tmp_path, recipe(pool, *pool["full"]))), out, progress=False)
    assert (out / "model.safetensors").is_file() and leftovers(out) == []


def test_temp_folder_of_a_live_process_is_named_not_removed(tmp_path: Path, pool: Pool) -> None:
    out = tmp_path / "out"
    alive = tmp_path / f".out.moerge-tmp-{os.getppid()}-0123abcd"
    alive.mkdir()
    with pytest.warns(UserWarning) as record:
        moerge.build(moerge.load_recipe(write_recipe(tmp_path, recipe(pool, *pool["full"]))), out, progress=False)
    assert [str(w.message) for w in record] == [
        f"temporary folders of other running processes beside {out}: {alive.name}"]
    assert alive.is_dir() and leftovers(out) == [alive]


def test_force_onto_a_symlink_leaves_no_old_folder(tmp_path: Path, pool: Pool) -> None:
    real = tmp_path / "previous"
    real.mkdir()
    (real / "old.txt").write_text("previous build")
    link = tmp_path / "out"
    link.symlink_to(real)
    moerge.build(moerge.load_recipe(write_recipe(tmp_path, recipe(pool, *pool["full"]))), link, force=True,
                 progress=False)
    assert not link.is_symlink() and (link / "model.safetensors").is_file() and leftovers(link) == []
    assert [p.name for p in real.iterdir()] == ["old.txt"]  # what the link pointed to is not touched


# ================================================================================ 5. two writers


def test_second_writer_fails_at_once(tmp_path: Path, pool: Pool, count_writes: list[Path]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "theirs.txt").write_text("being written")
    path = write_recipe(tmp_path, recipe(pool, *pool["full"]))
    with output_lock(out.absolute()):
        cli_fails(["build", path, out, "--force", "--quiet"],
                  f"{out}: another moerge process (pid {os.getpid()}) is writing this output; wait for it to finish "
                  "or choose another folder", out, *inputs_of(pool))
    assert count_writes == [] and leftovers(out) == []


def test_output_that_appeared_during_the_build_is_not_replaced(tmp_path: Path, pool: Pool,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    original = ShardedWriter.write

    def write(self: ShardedWriter, name: str, tensor: torch.Tensor) -> None:
        if not out.exists():  # someone else writes OUT while this build runs
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
        original(self, name, tensor)

    monkeypatch.setattr(ShardedWriter, "write", write)
    with pytest.raises(OutputError) as info:
        moerge.build(moerge.load_recipe(write_recipe(tmp_path, recipe(pool, *pool["full"]))), out, progress=False)
    assert str(info.value) == (f"{out}: output path appeared during the build and is not an empty folder; it was "
                               "left as it is and the new output discarded (use --force to replace it)")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and leftovers(out) == []


# ================================================================================ 6. no code from a checkpoint


def test_generate_never_runs_checkpoint_code(tmp_path: Path, pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = copy_expert(pool, tmp_path, "remote_code", src=pool["base"])
    marker = tmp_path / "code_ran"
    edit_json(folder / "config.json", model_type="evil_remote",
              auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (folder / "configuration_evil.py").write_text(code)
    (folder / "modeling_evil.py").write_text(code)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # what `echo y |` would answer
    cli_fails(["generate", folder, "hello"], f"{folder}: cannot load the model (it needs code from its own folder "
                                             "(auto_map), and moerge never runs code from a checkpoint)", folder)
    assert not marker.exists()


# ================================================================================ 7. one line, never a traceback


def test_recipe_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"base: caf\xe9\n")
    cli_fails(["validate", path], f"{path}: not UTF-8 text (byte 0xe9 at offset 9)", path)


def test_recipe_not_readable(tmp_path: Path, pool: Pool) -> None:
    path = write_recipe(tmp_path, recipe(pool, *pool["full"]))
    path.chmod(0)
    with unprivileged():
        cli_fails(["validate", path], f"{path}: cannot be read (Permission denied)")


def test_data_file_not_readable(tmp_path: Path, pool: Pool) -> None:
    path = routed_recipe(pool, tmp_path)
    data = tmp_path / "locked.jsonl"
    shutil.copy(pool["data"]["sentiment"], data)
    data.chmod(0)
    with unprivileged():
        cli_fails(["validate", path, "--set", f"experts.0.calibration.data={data}"],
                  f"{data}: cannot be read (Permission denied)")


def test_unreadable_safetensors_is_not_called_truncated(tmp_path: Path, pool: Pool) -> None:
    expert = copy_expert(pool, tmp_path, "locked")
    (expert / "model.safetensors").chmod(0)
    path = write_recipe(tmp_path, recipe(pool, expert))
    with unprivileged():
        cli_fails(["validate", path], f"{expert / 'model.safetensors'}: cannot be read (Permission denied)")


@pytest.mark.parametrize(("file", "content", "message"), [
    ("config.json", "[1, 2]", "not a JSON object (got list)"),
    ("adapter_config.json", '"lora"', "not a JSON object (got str)"),
    ("model.safetensors.index.json", "[]", "not a JSON object (got list)"),
    ("model.safetensors", None, "corrupt safetensors file (the header is a JSON list, not an object)"),
], ids=["config", "adapter_config", "index", "safetensors-header"])
def test_json_that_is_not_a_mapping(tmp_path: Path, pool: Pool, file: str, content: str | None, message: str) -> None:
    expert = copy_expert(pool, tmp_path, "odd", src=pool["lora"][0] if file == "adapter_config.json" else None)
    if content is None:
        header = b"[1, 2, 3]       "
        (expert / file).write_bytes(struct.pack("<Q", len(header)) + header)
    else:
        (expert / file).write_text(content)
    path = write_recipe(tmp_path, recipe(pool, expert))
    cli_fails(["validate", path], f"{expert / file}: {message}", expert)


def test_read_only_output_folder(tmp_path: Path, pool: Pool) -> None:
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    path = write_recipe(tmp_path, recipe(pool, *pool["full"]))
    with unprivileged():
        cli_fails(["build", path, parent / "out", "--quiet"],
                  f"{parent}: cannot create the output folder here (Permission denied)", parent)
    assert_clean(parent / "out")


def test_disk_full_names_the_output(tmp_path: Path, pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    original = ShardedWriter.write
    calls = []

    def write(self: ShardedWriter, name: str, tensor: torch.Tensor) -> None:
        calls.append(name)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write(2) raises: no file name
        original(self, name, tensor)

    monkeypatch.setattr(ShardedWriter, "write", write)
    out = tmp_path / "out"
    path = write_recipe(tmp_path, recipe(pool, *pool["full"]))
    cli_fails(["build", path, out, "--quiet"],
              f"{out}: cannot write the output (No space left on device); nothing was written there",
              *inputs_of(pool))
    assert_clean(out)


@pytest.mark.parametrize(("argv", "message"), [
    (["generate", "{moe}", "hi", "--max-new-tokens", "-1"],
     "--max-new-tokens: must be an integer >= 1, got '-1' (see moerge generate --help)"),
    (["calibrate", "{moe}", "--data", "{data}", "--batch-size", "0"],
     "--batch-size: must be an integer >= 1, got '0' (see moerge calibrate --help)"),
    (["export", "{moe}", "--to", "mixtral", "{out}", "--shard-size", "abc"],
     "--shard-size: 'abc' is not a size like 1GB, 500MB or 2GiB (see moerge export --help)"),
    (["calibrate", "{moe}", "--data", "{data}", "--holdout", "1.5"],
     "--holdout: must be a finite number in [0, 1), got '1.5' (see moerge calibrate --help)"),
    (["calibrate", "{moe}", "--data", "{data}", "--lr", "nan"],
     "--lr: must be a finite number > 0, got 'nan' (see moerge calibrate --help)"),
], ids=["max-new-tokens", "batch-size", "shard-size", "holdout", "lr"])
def test_command_line_numbers_out_of_range(moe: Path, pool: Pool, tmp_path: Path, argv: list[str],
                                           message: str) -> None:
    args = [a.format(moe=moe, data=pool["data"]["math"], out=tmp_path / "out") for a in argv]
    cli_fails(args, message, moe, tmp_path)


def test_generate_chat_without_a_template(moe: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no_template"
    shutil.copytree(moe, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    for t in folder.glob("chat_template*"):
        t.unlink()
    cli_fails(["generate", folder, "hello", "--chat"], f"{folder}: --chat: the tokenizer has no chat template", folder)


def test_analyze_out_onto_a_file(tmp_path: Path, pool: Pool) -> None:
    path = write_recipe(tmp_path, recipe(pool, *pool["full"]))
    target = tmp_path / "report.txt"
    target.write_text("mine")
    cli_fails(["analyze", path, "--out", target, "--quiet"], f"{target}: output path exists and is not a folder",
              target)


@pytest.mark.parametrize(("case", "message"), [
    ("router", ("{c}/moerge_router.safetensors: truncated or corrupt safetensors file (file shorter than its 8-byte "
               "header length)")),
    ("block", "{c}/config.json: moerge: malformed moerge block (needs experts, level, units)"),
    ("recipe", "{c}/moerge_recipe.yaml: not UTF-8 text (byte 0xff at offset 0)"),
], ids=["calibrate-corrupt-router", "inspect-block-not-a-mapping", "add-expert-recipe-not-utf8"])
def test_malformed_checkpoint_files(moe: Path, pool: Pool, tmp_path: Path, case: str, message: str) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(moe, ckpt)
    data = ["--data", str(pool["data"]["math"])]
    if case == "router":
        (ckpt / "moerge_router.safetensors").write_bytes(b"junk")
        argv = ["calibrate", str(ckpt), *data]
    elif case == "block":
        edit_json(ckpt / "config.json", moerge=["not", "a", "mapping"])
        argv = ["inspect", str(ckpt)]
    else:
        (ckpt / "moerge_recipe.yaml").write_bytes(b"\xff\xfe")
        argv = ["add-expert", str(ckpt), "--name", "more", "--source", str(pool["full"][1]), *data]
    cli_fails(argv, message.format(c=ckpt), ckpt)


# ================================================================================ 8. smaller


def test_lora_adapter_bin_with_allow_pickle(tmp_path: Path, pool: Pool) -> None:
    adapter = copy_expert(pool, tmp_path, "lora_bin", src=pool["lora"][0])
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    fails(tmp_path, recipe(pool, adapter), CheckpointError,
          f"{adapter / 'adapter_model.bin'}: refusing to unpickle a .bin checkpoint; convert it to safetensors or "
          "pass --allow-pickle (loads with weights_only=True)")
    allowed = moerge.build(moerge.load_recipe(write_recipe(tmp_path, recipe(pool, adapter, allow_pickle=True))),
                           tmp_path / "allowed", progress=False)
    reference = moerge.build(moerge.load_recipe(write_recipe(tmp_path, recipe(pool, pool["lora"][0]), "ref.yaml")),
                             tmp_path / "reference", progress=False)
    got, want = load_file(allowed / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_staged_commit_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupt between the two staged files leaves the old checkpoint whole; a commit swaps both."""
    from moerge.routing.commit import Staged

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name, text in (("config.json", "old config"), ("moerge_router.safetensors", "old router"),
                       ("model.safetensors", "weights")):
        (ckpt / name).write_text(text)
    before = snapshot(ckpt)
    real_replace, calls = os.replace, []

    def interrupted(src: Any, dst: Any) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    staged = Staged(ckpt)
    staged.write_text("moerge_router.safetensors", "new router")
    staged.write_text("config.json", "new config")
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        staged.commit()
    monkeypatch.undo()
    assert snapshot(ckpt) == before and leftovers(ckpt) == []
    staged = Staged(ckpt)
    staged.write_text("moerge_router.safetensors", "new router")
    staged.write_text("config.json", "new config")
    staged.commit()
    assert {p.name: p.read_text() for p in ckpt.iterdir()} == {
        "config.json": "new config", "moerge_router.safetensors": "new router", "model.safetensors": "weights"}
    assert leftovers(ckpt) == []


def test_index_shard_outside_the_folder(tmp_path: Path, pool: Pool) -> None:
    expert = copy_expert(pool, tmp_path, "escape")
    index = expert / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "../expert_1/model.safetensors"}}))
    fails(tmp_path, recipe(pool, expert), CheckpointError,
          f"{index}: model.norm.weight: shard name '../expert_1/model.safetensors' points outside the model folder")


@pytest.mark.parametrize("name", [".", ".."])
def test_expert_names_dot_and_dotdot(tmp_path: Path, pool: Pool, name: str) -> None:
    body = recipe(pool, *pool["full"])
    body["experts"][0]["name"] = name
    fails(tmp_path, body, RecipeError, f"{tmp_path / 'recipe.yaml'}: experts[0].name: expert name '{name}' must have "
                                       "a letter or digit (it is used in file names)")


def test_expert_identical_to_the_base_warns(tmp_path: Path, pool: Pool) -> None:
    twin = copy_expert(pool, tmp_path, "same_as_base", src=pool["base"])
    path = write_recipe(tmp_path, recipe(pool, pool["full"][0], twin))
    with pytest.warns(UserWarning, match=rf"^expert 'same_as_base' \({twin}\) has the same weights as the base: "
                                         "its task vector is zero$"):
        assert cli("validate", path)[0] == 0


# ================================================================================ 9. recipes as users write them


@pytest.mark.parametrize(("modules", "parsed"), [("[mlp]", "mlp"), ("[attention, mlp]", "both"),
                                                 ("[attention]", "attention")])
def test_routing_modules_as_a_list(tmp_path: Path, pool: Pool, modules: str, parsed: str) -> None:
    path = routed_recipe(pool, tmp_path)
    assert moerge.load_recipe(path, overrides=[f"routing.modules={modules}"]).routing.modules == parsed  # type: ignore[union-attr]
    cli_fails(["validate", path, "--set", "routing.modules=[mlp, ffn]"],
              f"{path}: routing.modules: unknown module 'ffn'; a list holds mlp and/or attention", path)


# ================================================================================ property: mutated recipes


def _valid_body(pool: Pool) -> dict[str, Any]:
    body = recipe(pool, pool["full"][0], pool["lora"][0], merge={"method": "ties", "density": 0.5, "lambda": 1.0},
                  routing={"select": {"top_fraction": 0.5}, "modules": "mlp", "expert": {"kind": "dense"},
                           "router": {"level": "sequence", "top_k": 1, "scale": 20.0}},
                  output={"shard_size": "1GB"}, seed=0)
    body["experts"][0]["calibration"] = {"data": str(pool["data"]["sentiment"]), "chat_template": True,
                                         "max_samples": 8}
    return body


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of a nested dict / list (the root excluded)."""
    out: list[tuple[Any, ...]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        out.append((*prefix, key))
        out += _paths(value, (*prefix, key))
    return out


VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, 0, -1, 10**18]),
    st.text(max_size=20), st.sampled_from(["", " ", "x" * 5000, "../..", "/", "\x00", "mlp", "1.3x", "1e9GB"]),
    st.lists(st.integers(min_value=-3, max_value=40), max_size=4), st.just({}), st.just([]),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _mutate(body: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    body = json.loads(json.dumps(body))
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = _paths(body)
        path = data.draw(st.sampled_from(paths), label="path")
        parent: Any = body
        for key in path[:-1]:
            parent = parent[key]
        op = data.draw(st.sampled_from(["set", "delete", "add", "rename"]), label="op")
        key = path[-1]
        if op == "set":
            parent[key] = data.draw(VALUES, label="value")
        elif op == "delete" and isinstance(parent, dict):
            del parent[key]
        elif op == "delete":
            parent.pop(key)
        elif op == "add" and isinstance(parent, dict):
            parent[data.draw(st.text(min_size=1, max_size=8), label="new key")] = data.draw(VALUES, label="value")
        elif op == "rename" and isinstance(parent, dict):
            parent[f"{key}x"] = parent.pop(key)
    return body


@pytest.fixture(scope="module")
def mutation_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mutations")


@settings(max_examples=int(os.environ.get("MOERGE_FUZZ_EXAMPLES", "40")), deadline=None,
          derandomize=not os.environ.get("MOERGE_FUZZ_EXAMPLES"),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_recipes_fail_cleanly(mutation_root: Path, llama_pool: Pool, data: st.DataObject) -> None:
    """Keys, types and values of a valid recipe mutated: ``validate`` (and, for some, ``build``) either succeed or
    exit 2 with one ``error:`` line; never a traceback, never a partial output."""
    body = _mutate(_valid_body(llama_pool), data)
    path = mutation_root / "recipe.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False, allow_unicode=True))
    code, _, err = cli("validate", path)
    assert code in (0, 2), err
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
        return
    if data.draw(st.integers(0, 3), label="build?") == 0:
        out = mutation_root / "out"
        shutil.rmtree(out, ignore_errors=True)
        code, _, err = cli("build", path, out, "--quiet")
        assert code in (0, 2), err
        assert (out / "config.json").is_file() if code == 0 else not out.exists(), err
        assert leftovers(out) == []


def test_identical_expert_found_by_windows_above_the_full_compare_size(tmp_path: Path, pool: Pool,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Past FULL_COMPARE the check reads spread windows only: a copy of the base still warns, a real fine-tune
    (which differs nearly everywhere) does not."""
    preflight = importlib.import_module("moerge.pipeline.preflight")

    monkeypatch.setattr(preflight, "FULL_COMPARE", 0)
    twin = copy_expert(pool, tmp_path, "same_as_base", src=pool["base"])
    path = write_recipe(tmp_path, recipe(pool, pool["full"][0], twin))
    with pytest.warns(UserWarning, match=r"^expert 'same_as_base' .* has the same weights as the base"):
        assert cli("validate", path)[0] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert cli("validate", write_recipe(tmp_path, recipe(pool, *pool["full"])))[0] == 0
