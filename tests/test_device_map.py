"""Loading for serving at scale (issue 11): device maps, offloading and dtype casts of a built checkpoint.

* ``device_map="auto"`` + ``dtype=bfloat16`` loads and generates exactly as a plain bf16 load;
* a device map that splits the layers (here: CPU and disk offload, the only devices of a CPU machine) keeps every
  routed linear's expert tensors with its weight when it runs, never splits a decoder layer, runs the sequence
  router where the map puts it, and keeps no cached effective weights for offloaded linears (the cache would hold in
  memory what offloading keeps out); a map that offloads a tensor the checkpoint lacks is refused at load;
* ``model.to(bfloat16)`` / ``.half()`` equal a load in that dtype and reset the route cache;
* CUDA variants of the same run where a GPU is present.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_modeling import build, left_pad, load, point_prototypes_at, prompts3, save

from moerge.modeling import RoutedLinear
from moerge.modeling.modeling_moerge import RouteSlot

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def checkpoint(tmp_path: Path, kind: str, level: str) -> Path:
    """A llama checkpoint (routed layer-0 MLP and layer-1 attention) whose routers have every tensor."""
    config, sd, _, _ = build("llama", kind, level)
    for key in [k for k in sd if k.endswith("moerge_router.prototypes")]:
        sd[key.replace("prototypes", "center")] = torch.randn(32) * 0.1
    return save(tmp_path / f"{kind}_{level}", config, sd)


def run(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefill logits (B, T, V), 5 greedy tokens (B, T + 5))."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                             do_sample=False, pad_token_id=0)
    return out, gen


def routed(model) -> dict[str, RoutedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, RoutedLinear)}


def spy_devices(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, set[str]]]:
    """Record, inside every routed linear's forward (after accelerate has loaded it), the devices of its weight
    and of its experts' tensors."""
    seen: list[tuple[str, set[str]]] = []
    original = RoutedLinear._caching

    def caching(self: RoutedLinear) -> bool:
        tensors = [t for e in range(len(self.experts)) for t in self.expert(e).values()]
        seen.append((str(self.weight.device), {str(t.device) for t in tensors}))
        return original(self)

    monkeypatch.setattr(RoutedLinear, "_caching", caching)
    return seen


@pytest.mark.parametrize("kind,level", [("bit1", "sequence"), ("twin", "sequence"), ("sparse", "token"),
                                        ("dense", "token")])
def test_auto_device_map_bf16_equals_a_plain_bf16_load(tmp_path: Path, kind: str, level: str) -> None:
    path = checkpoint(tmp_path, kind, level)
    plain, auto = load(path, dtype=torch.bfloat16), load(path, dtype=torch.bfloat16, device_map="auto")
    assert {"LlamaDecoderLayer", "RoutedLinear"} <= set(auto._no_split_modules)
    for lin in routed(auto).values():
        assert lin.weight.dtype == torch.bfloat16
        assert {t.device for ex in lin.experts for t in ex.tensors().values()} == {lin.weight.device}
    ids, mask = left_pad(prompts3())
    if level == "sequence":
        for model in (plain, auto):
            point_prototypes_at(model, prompts3())  # a mixed-route batch
    (want, want_gen), (got, got_gen) = run(plain, ids, mask), run(auto, ids, mask)
    assert torch.equal(got, want) and torch.equal(got_gen, want_gen)


def split_map(level: str) -> dict[str, str]:
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
                  "model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "disk"}
    if level == "sequence":
        device_map["moerge_router"] = "disk"  # the router's input comes from a layer elsewhere
    return device_map


@pytest.mark.parametrize("offload_buffers", [False, True])
@pytest.mark.parametrize("kind,level", [("bit1", "sequence"), ("dense", "sequence"), ("lora", "token"),
                                        ("sparse", "token")])
def test_split_device_map_with_disk_offload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
                                            level: str, offload_buffers: bool) -> None:
    plain = load(checkpoint(tmp_path, kind, level))
    if level == "sequence":  # a mixed-route batch
        point_prototypes_at(plain, prompts3())
    path = tmp_path / "pointed"
    plain.save_pretrained(path)
    model = load(path, device_map=split_map(level), offload_folder=str(tmp_path / "offload"),
                 offload_buffers=offload_buffers)
    assert model.hf_device_map == split_map(level)
    lins = routed(model)
    offloaded = {n for n, lin in lins.items() if lin.weight.device.type == "meta"}
    assert offloaded == {n for n in lins if n.startswith("model.layers.0.")}
    ids, mask = left_pad(prompts3())
    seen = spy_devices(monkeypatch)
    (want, want_gen), (got, got_gen) = run(plain, ids, mask), run(model, ids, mask)
    assert (got - want).abs().max() <= 1e-5  # offloaded linears take the uncached path: float rounding only
    assert torch.equal(got_gen, want_gen)
    assert seen and all(experts == {weight} == {"cpu"} for weight, experts in seen), seen  # loaded for the call
    if level == "sequence":
        assert model.last_routes().argmax(-1).tolist() == [0, 1, 2]
    assert all(lins[n].cache_bytes() == 0 for n in offloaded)
    cached = kind != "lora"  # lora keeps nothing: its factors are applied as they are
    assert all((lin.cache_bytes() > 0) == cached for n, lin in lins.items() if n not in offloaded)
    assert model.route_cache_bytes() == sum(lin.cache_bytes() for lin in lins.values())
    model.clear_route_cache()
    assert model.route_cache_bytes() == 0


def test_auto_with_little_memory_offloads_whole_layers(tmp_path: Path) -> None:
    from accelerate.utils import compute_module_sizes

    path = checkpoint(tmp_path, "dense", "token")
    budget = int(0.95 * compute_module_sizes(load(path))[""])  # room for all but a layer or so
    model = load(path, device_map="auto", max_memory={"cpu": budget}, offload_folder=str(tmp_path / "off"))
    device_map = model.hf_device_map
    assert "disk" in device_map.values() and "cpu" in device_map.values()
    for name in device_map:  # a decoder layer (with its routed linears and routers) is never split
        assert not name.startswith("model.layers.") or name.count(".") == 2, device_map
    ids, mask = left_pad(prompts3())
    assert (run(model, ids, mask)[0] - run(load(path), ids, mask)[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_offloading_a_tensor_the_checkpoint_lacks_is_refused(tmp_path: Path, level: str) -> None:
    config, sd, _, _ = build("llama", "wemoe", level)  # no router `center` in the file (it is optional)
    path = save(tmp_path / "m", config, sd)
    with pytest.raises(ValueError, match="does not hold.*moerge_router.center"):
        load(path, device_map=split_map(level), offload_folder=str(tmp_path / "offload"))
    device_map = {**split_map(level), "model.layers.0": "cpu"}
    if level == "sequence":
        device_map["moerge_router"] = "cpu"
    model = load(path, device_map=device_map, offload_folder=str(tmp_path / "offload2"))  # nothing missing offloaded
    ids, mask = left_pad(prompts3())
    assert (run(model, ids, mask)[0] - run(load(path), ids, mask)[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("cast,dtype", [("bf16", torch.bfloat16), ("half", torch.float16)])
def test_dtype_casts_equal_a_load_in_that_dtype_and_reset_the_cache(tmp_path: Path, cast: str, dtype) -> None:
    path = checkpoint(tmp_path, "sparse", "sequence")
    model = load(path)
    ids, mask = left_pad(prompts3())
    run(model, ids, mask)
    fp32_bytes = model.route_cache_bytes()
    assert fp32_bytes > 0
    model = model.to(torch.bfloat16) if cast == "bf16" else model.half()
    assert model.route_cache_bytes() == 0
    lin = next(iter(routed(model).values()))
    assert lin.weight.dtype == dtype and lin.experts[0].values.dtype == dtype
    assert lin.experts[0].indices.dtype == torch.int32
    got = run(model, ids, mask)
    # `.to(dtype)` also casts the base's float32 rotary `inv_freq` buffer (transformers does so for the base
    # alone too): compare with a load in that dtype, cast the same way
    want = run(load(path, dtype=dtype).to(dtype), ids, mask)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert model.route_cache_bytes() == fp32_bytes // 2  # the same cached weights, in 2-byte floats


def test_route_slot_moves_a_route_once_per_device() -> None:
    slot = RouteSlot()
    slot.set_rows(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), max_groups=4)  # (B, E) on CPU
    here = slot.on(torch.device("cpu"))
    assert here[0] is slot.route and here[1] is slot.order
    there = slot.on(torch.device("meta"))  # another device
    assert all(t.device.type == "meta" for t in there) and there[0].shape == (3, 2)
    assert slot.on(torch.device("meta"))[0] is there[0]  # moved once, then reused by every linear
    slot.set_rows(torch.tensor([[0.0, 1.0]] * 3), max_groups=4)  # a new route: moved again
    assert slot.on(torch.device("meta"))[0] is not there[0]


# --------------------------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------------------------
@CUDA
@pytest.mark.parametrize("kind,level", [("bit1", "sequence"), ("twin", "token")])
def test_cuda_auto_device_map_bf16_equals_a_plain_bf16_load(tmp_path: Path, kind: str, level: str) -> None:
    path = checkpoint(tmp_path, kind, level)
    plain = load(path, dtype=torch.bfloat16).to("cuda")
    auto = load(path, dtype=torch.bfloat16, device_map="auto")
    for lin in routed(auto).values():
        assert lin.weight.device.type == "cuda"
        assert {t.device for ex in lin.experts for t in ex.tensors().values()} == {lin.weight.device}
    ids, mask = (t.to("cuda") for t in left_pad(prompts3()))
    (want, want_gen), (got, got_gen) = run(plain, ids, mask), run(auto, ids, mask)
    assert torch.equal(got, want) and torch.equal(got_gen, want_gen)


@CUDA
@pytest.mark.parametrize("kind,level", [("dense", "sequence"), ("sparse", "token")])
def test_cuda_split_with_cpu_offload_and_router_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       kind: str, level: str) -> None:
    """Layer 0 on the GPU, layer 1 offloaded to CPU (run on the GPU), the sequence router on the CPU."""
    path = checkpoint(tmp_path, kind, level)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                  "model.norm": 0, "lm_head": 0}
    if level == "sequence":
        device_map["moerge_router"] = "cpu"
    model = load(path, device_map=device_map)
    seen = spy_devices(monkeypatch)
    ids, mask = left_pad(prompts3())
    got, got_gen = run(model, ids.to("cuda"), mask.to("cuda"))
    want, want_gen = run(load(path).to("cuda"), ids.to("cuda"), mask.to("cuda"))
    assert (got - want).abs().max() <= 1e-4 and torch.equal(got_gen, want_gen)
    assert seen and all(experts == {weight} and weight.startswith("cuda") for weight, experts in seen)
    assert all(lin.cache_bytes() == 0 for n, lin in routed(model).items() if n.startswith("model.layers.1."))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_route_moved_once_per_device(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, "wemoe", "sequence")
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                  "model.norm": 1, "lm_head": 1, "moerge_router": 1}
    model = load(path, device_map=device_map)
    ids, mask = (t.to("cuda:0") for t in left_pad(prompts3()))
    (want, want_gen), (got, got_gen) = run(load(path).to("cuda:0"), ids, mask), run(model, ids, mask)
    assert (got.to("cuda:0") - want).abs().max() <= 1e-4 and torch.equal(got_gen.to("cuda:0"), want_gen)
    slot = model._moerge.sequence_slot  # the route is made on the router's GPU, copied once to the other
    assert slot.route.device == torch.device("cuda", 1) and set(slot._moved) == {torch.device("cuda", 0)}
