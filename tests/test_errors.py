"""The bad-input catalogue: every user mistake gives one exact ``<file>: <field>: <message>`` error and leaves
nothing behind (no output folder, no ``.<name>.moerge-tmp-*`` folder beside it).

Each case writes a recipe into ``tmp_path`` and runs ``moerge.build(moerge.load_recipe(path), out)``.  Broken
experts are copies of the session pool's experts, edited; experts of another shape come from ``make_base``
once per module (:func:`others`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

import moerge
from moerge.errors import CheckpointError, NotSupportedError, OutputError, RecipeError, SourceError
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
