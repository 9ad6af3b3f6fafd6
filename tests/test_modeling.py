"""Tests of moerge.modeling: MoergeConfig / MoergeForCausalLM on hand-built tiny checkpoints.

Each checkpoint wraps a tiny random base (Llama, or Qwen2 with tied embeddings and q/k/v biases); every expert is
the base plus random deltas on the routed units' linears, stored in the format of docs/FORMAT.md for each kind.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from isolation import HIDE_MOERGE
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from moerge.modeling import (
    MoergeConfig,
    MoergeForCausalLM,
    RoutedLinear,
    auto_map,
    register,
    unpack_bits,
    write_remote_code,
)

REPO = Path(__file__).resolve().parents[1]
KINDS = ["dense", "wemoe", "twin", "bit1", "lora", "sparse"]
EXPERTS = ["alpha", "beta", "gamma"]
SCALE = 0.05  # size of the random expert deltas

register()


# ---------------------------------------------------------------------------------------------------------------
# tiny bases
# ---------------------------------------------------------------------------------------------------------------
def llama_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def qwen_base() -> Qwen2ForCausalLM:
    torch.manual_seed(1)
    cfg = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        initializer_range=0.1,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Qwen2ForCausalLM(cfg).eval()


BASES = {"llama": llama_base, "qwen2": qwen_base}
UNITS = {  # routed units and their linears; attention units get kwargs hidden_states, MLPs a positional arg
    "llama": {
        "model.layers.0.mlp": ["gate_proj", "up_proj", "down_proj"],
        "model.layers.1.self_attn": ["q_proj", "v_proj", "o_proj"],
    },
    "qwen2": {
        "model.layers.0.self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "model.layers.1.mlp": ["down_proj"],
    },
}


# ---------------------------------------------------------------------------------------------------------------
# hand-built experts
# ---------------------------------------------------------------------------------------------------------------
def reference_bits(signs: torch.Tensor, in_features: int) -> torch.Tensor:
    """Independent little-endian unpacking (numpy) for the bit1 reference."""
    bits = np.unpackbits(signs.numpy(), axis=1, bitorder="little")[:, :in_features]
    return torch.from_numpy(bits.astype(np.float32))


def make_expert(kind: str, w: torch.Tensor, zero: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Stored tensors of one expert for kind and its full weight W_e = W_s + Δ."""
    out_f, in_f = w.shape
    s = 0.0 if zero else SCALE
    d = torch.randn(out_f, in_f) * s
    if kind == "dense":
        return {"weight": w + d}, w + d
    if kind == "wemoe":
        return {"delta": d}, w + d
    if kind == "twin":
        r = min(out_f, in_f)  # full rank
        u, v = torch.randn(out_f, r) * s, torch.randn(r, in_f) * 0.3
        return {"U": u, "V": v}, w + u @ v
    if kind == "lora":
        a, b = torch.randn(4, in_f) * 0.3, torch.randn(out_f, 4) * s
        return {"A": a, "B": b}, w + b @ a
    if kind == "sparse":  # density 1: every index, shuffled
        idx = torch.randperm(out_f * in_f).to(torch.int32)
        return {"indices": idx, "values": d.flatten()[idx.long()]}, w + d
    if kind == "bit1":
        signs = torch.randint(0, 256, (out_f, (in_f + 7) // 8), dtype=torch.uint8)
        scale = torch.rand(out_f) * s
        return {"signs": signs, "scale": scale}, w + scale[:, None] * (2 * reference_bits(signs, in_f) - 1)
    raise ValueError(kind)


def build(
    base_name: str,
    kind: str,
    level: str,
    *,
    zero: bool = False,
    top_k: int | None = 1,
    initialized: bool = True,
    fallback: dict | None = None,
    units: dict | None = None,
    seed: int = 0,
):
    """-> (MoergeConfig, state dict, base model, [expert reference models])."""
    base = BASES[base_name]()
    units = units or UNITS[base_name]
    torch.manual_seed(seed)
    refs = [copy.deepcopy(base) for _ in EXPERTS]
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    if base.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    plan_units = {}
    for unit, linears in units.items():
        plan_units[unit] = {"kind": kind, "linears": {}}
        for lin in linears:
            path = f"{unit}.{lin}"
            layer = base.get_submodule(path)
            spec = {"bias": layer.bias is not None, "experts": []}
            for e, ref in enumerate(refs):
                stored, w_e = make_expert(kind, layer.weight.detach(), zero)
                ref_layer = ref.get_submodule(path)
                ref_layer.weight.data.copy_(w_e)
                if layer.bias is not None:
                    stored["bias_delta"] = (
                        torch.zeros_like(layer.bias) if zero else torch.randn_like(layer.bias) * SCALE
                    )
                    ref_layer.bias.data.copy_(layer.bias.detach() + stored["bias_delta"])
                spec["experts"].append({k: list(v.shape) for k, v in stored.items()})
                sd.update({f"{path}.experts.{e}.{k}": v for k, v in stored.items()})
            plan_units[unit]["linears"][lin] = spec
    hidden = base.config.hidden_size
    routers = ["moerge_router"] if level == "sequence" else [f"{u}.moerge_router" for u in units]
    for r in routers:
        sd[f"{r}.prototypes"] = torch.randn(len(EXPERTS), hidden)
        sd[f"{r}.scale"] = torch.tensor(10.0)
        sd[f"{r}.bias"] = torch.zeros(len(EXPERTS))
    plan = {
        "version": 1,
        "experts": EXPERTS,
        "level": level,
        "top_k": top_k,
        "router_input": next(iter(units)),
        "initialized": initialized,
        "fallback": fallback,
        "units": plan_units,
    }
    config = MoergeConfig(base_config=base.config.to_dict(), moerge=plan, dtype="float32")
    return config, sd, base, refs


def save(out: Path, config: MoergeConfig, sd: dict, sharded: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    sd = {k: v.contiguous() for k, v in sd.items()}
    if not sharded:
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = sorted(sd)
        halves = {
            "model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2],
        }
        weight_map = {}
        for fname, keys in halves.items():
            save_file({k: sd[k] for k in keys}, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in keys})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
    write_remote_code(out)
    return out


def load(path: Path, **kwargs) -> MoergeForCausalLM:
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    assert isinstance(model, MoergeForCausalLM)
    return model.eval()


@torch.no_grad()
def logits(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits


def ids_batch(b: int = 2, t: int = 7, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (b, t), generator=g)


# ---------------------------------------------------------------------------------------------------------------
# (a) zero deltas == base; (b) forced route == expert
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base_name", ["llama", "qwen2"])
@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("kind", KINDS)
def test_zero_deltas_equal_base_and_forced_route_equals_expert(tmp_path, base_name, kind, level):
    ids = ids_batch()
    config, sd, base, _ = build(base_name, kind, level, zero=True)
    model = load(save(tmp_path / "zero", config, sd))
    assert (logits(model, ids) - logits(base, ids)).abs().max() <= 1e-5

    config, sd, base, refs = build(base_name, kind, level)
    model = load(save(tmp_path / "rand", config, sd))
    for t, name in enumerate(EXPERTS):
        model.force_route(name if t else 0)  # by name and by index
        assert (logits(model, ids) - logits(refs[t], ids)).abs().max() <= 1e-4, (kind, name)
        assert (logits(refs[t], ids) - logits(base, ids)).abs().max() > 1e-3  # the expert really differs
    model.force_route(None)
    assert logits(model, ids).shape == (2, 7, 128)


def test_bit1_unpacking_little_endian_with_pad_bits():
    signs = torch.randint(0, 256, (5, 2), dtype=torch.uint8)
    signs[:, 1] &= 0b00011111  # 13 columns: the 3 high bits of the last byte are padding (0)
    assert torch.equal(unpack_bits(signs, 13).float(), reference_bits(signs, 13))
    assert unpack_bits(torch.tensor([[0b00000101]], dtype=torch.uint8), 3).tolist() == [[1, 0, 1]]


def test_force_route_mix_and_errors(tmp_path):
    config, sd, base, refs = build("llama", "wemoe", "sequence")
    model = load(save(tmp_path / "m", config, sd))
    with pytest.raises(ValueError, match="alpha"):
        model.force_route("delta")
    with pytest.raises(ValueError):
        model.force_route(7)
    model.force_route({"alpha": 3, "gamma": 1})
    ids = ids_batch()
    logits(model, ids)
    assert torch.allclose(model.last_routes(), torch.tensor([[0.75, 0.0, 0.25]] * 2))
    # the mix equals a base whose weights are W_s + 0.75 Δ_alpha + 0.25 Δ_gamma
    mixed = copy.deepcopy(base)
    for (name, p), pa, pg in zip(mixed.named_parameters(), refs[0].parameters(), refs[2].parameters()):
        p.data.add_(0.75 * (pa.data - p.data) + 0.25 * (pg.data - p.data))
    assert (logits(model, ids) - logits(mixed, ids)).abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# loading details
# ---------------------------------------------------------------------------------------------------------------
def test_tied_embeddings_sharded_checkpoint_and_tensor_names(tmp_path):
    config, sd, _, refs = build("qwen2", "bit1", "sequence")
    path = save(tmp_path / "q", config, sd, sharded=True)
    model = load(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = set(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.layers.0.self_attn.q_proj.bias" in names
    assert "model.layers.0.self_attn.q_proj.experts.2.signs" in names
    assert "model.layers.0.self_attn.q_proj.experts.2.bias_delta" in names
    assert "moerge_router.prototypes" in names
    lin = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(lin, RoutedLinear)
    assert lin.experts[0].signs.dtype == torch.uint8
    assert torch.equal(lin.experts[1].signs, sd["model.layers.0.self_attn.q_proj.experts.1.signs"])
    model.force_route("beta")
    ids = ids_batch()
    assert (logits(model, ids) - logits(refs[1], ids)).abs().max() <= 1e-4


def test_dtypes_bf16_load(tmp_path):
    config, sd, _, _ = build("llama", "sparse", "token")
    model = load(save(tmp_path / "m", config, sd), dtype=torch.bfloat16)
    lin = model.get_submodule("model.layers.0.mlp.up_proj")
    assert lin.weight.dtype == torch.bfloat16
    assert lin.experts[0].indices.dtype == torch.int32
    assert lin.experts[0].values.dtype == torch.bfloat16
    assert model.get_submodule("model.layers.0.mlp.moerge_router").prototypes.dtype == torch.bfloat16
    assert torch.isfinite(logits(model, ids_batch()).float()).all()


def test_save_pretrained_roundtrip_and_cache_invalidation(tmp_path):
    config, sd, _, _ = build("llama", "twin", "sequence")
    model = load(save(tmp_path / "a", config, sd))
    ids = ids_batch()
    before = logits(model, ids)
    model.save_pretrained(tmp_path / "b")
    for f in ("configuration_moerge.py", "modeling_moerge.py", "config.json"):
        assert (tmp_path / "b" / f).exists()
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["auto_map"] == auto_map() and saved["model_type"] == "moerge"
    assert saved["base_config"]["hidden_size"] == 32 and saved["moerge"]["experts"] == EXPERTS
    again = load(tmp_path / "b")
    assert torch.equal(logits(again, ids), before)
    # an in-place weight change drops the cached effective weights
    lin = again.get_submodule("model.layers.0.mlp.down_proj")
    with torch.no_grad():
        for ex in lin.experts:
            ex.U.mul_(3)
    assert (logits(again, ids) - before).abs().max() > 1e-4


def test_router_center_is_optional_and_used(tmp_path):
    config, sd, _, _ = build("llama", "wemoe", "sequence")
    model, info = AutoModelForCausalLM.from_pretrained(
        save(tmp_path / "a", config, sd), output_loading_info=True
    )
    assert not info["missing_keys"]  # no center in the file: it is 0
    assert torch.equal(model.moerge_router.center, torch.zeros(32))
    sd["moerge_router.center"] = torch.randn(32)
    router = load(save(tmp_path / "b", config, sd)).moerge_router
    x = torch.randn(3, 32)
    cos = torch.nn.functional.cosine_similarity(
        (x - sd["moerge_router.center"])[:, None], router.prototypes[None], -1
    )
    want = torch.softmax(router.scale * cos + router.bias, -1)
    assert torch.allclose(router.probs(x), want, atol=1e-6)


def test_config_mirrors_base():
    config, *_ = build("qwen2", "lora", "sequence")
    assert config.get_text_config() is config.base_config
    assert config.vocab_size == 128 and config.hidden_size == 32 and config.num_hidden_layers == 2
    assert config.tie_word_embeddings is True
    assert type(config.base_config).__name__ == "Qwen2Config"
    assert config.to_dict()["base_config"]["model_type"] == "qwen2"


def test_generation_config_special_tokens_from_base(tmp_path):
    config, sd, _, _ = build("llama", "wemoe", "sequence")
    model = load(save(tmp_path / "m", config, sd))  # no generation_config.json in the folder
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (2, 0)


# ---------------------------------------------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------------------------------------------
def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    return ids, mask


def prompts3() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, 128, (n,), generator=g) for n in (4, 7, 10)]


def point_prototypes_at(model: MoergeForCausalLM, prompts: list[torch.Tensor]) -> None:
    """Set the sequence router's prototypes to each prompt's pooled router input: prompt i -> expert i."""
    seen = []
    unit = model.get_submodule(model.config.moerge["router_input"])
    handle = unit.register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).mean(1)), with_kwargs=True
    )
    model.force_route(0)
    for p in prompts:
        logits(model, p[None])
    handle.remove()
    model.force_route(None)
    with torch.no_grad():
        model.moerge_router.prototypes.copy_(torch.cat(seen))
        model.moerge_router.scale.fill_(200.0)


def test_mixed_route_batch_equals_rows_alone(tmp_path):
    config, sd, _, _ = build(
        "llama", "dense", "sequence", units={"model.layers.0.mlp": ["gate_proj", "up_proj", "down_proj"]}
    )
    model = load(save(tmp_path / "m", config, sd))
    prompts = prompts3()
    point_prototypes_at(model, prompts)
    ids, mask = left_pad(prompts)
    batch_logits = logits(model, ids, mask)
    routes = model.last_routes()
    assert routes.shape == (3, 3)
    assert routes.argmax(-1).tolist() == [0, 1, 2]
    for i, p in enumerate(prompts):
        assert (batch_logits[i, -1] - logits(model, p[None])[0, -1]).abs().max() <= 1e-4
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert model.last_routes().argmax(-1).tolist() == [0, 1, 2]  # kept for every decode step
    for i, p in enumerate(prompts):
        alone = model.generate(input_ids=p[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert out[i, ids.shape[1] :].tolist() == alone[0, len(p) :].tolist()


@pytest.mark.parametrize("kind", ["dense", "bit1", "twin"])
def test_many_distinct_routes_use_the_per_token_path(tmp_path, kind):
    """Soft routes, more distinct routes than cached weights: rows still equal the rows alone."""
    config, sd, _, _ = build("llama", kind, "sequence", top_k=None)
    model = load(save(tmp_path / "m", config, sd))
    model._moerge.max_groups = 1  # 3 distinct routes > 1: no grouping
    prompts = prompts3()
    point_prototypes_at(model, prompts)
    with torch.no_grad():
        model.moerge_router.scale.fill_(3.0)  # soft: every expert gets some weight
    ids, mask = left_pad(prompts)
    batch_logits = logits(model, ids, mask)
    assert model._moerge.sequence_slot.groups is None and (model.last_routes() > 0).all()
    for i, p in enumerate(prompts):
        assert (batch_logits[i, -1] - logits(model, p[None])[0, -1]).abs().max() <= 1e-4


def test_gradients_reach_shared_weights(tmp_path):
    config, sd, _, _ = build("qwen2", "lora", "sequence")
    model = load(save(tmp_path / "m", config, sd)).train()
    ids = ids_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    lin = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert lin.bias.grad is not None


def test_token_level_mixed_batch_equals_rows_alone(tmp_path):
    config, sd, _, _ = build("qwen2", "lora", "token", top_k=2)
    model = load(save(tmp_path / "m", config, sd))
    prompts = prompts3()
    ids, mask = left_pad(prompts)
    batch_logits = logits(model, ids, mask)
    routes = model.last_routes()
    assert set(routes) == set(UNITS["qwen2"])
    r = routes["model.layers.0.self_attn"]
    assert r.shape == (3, 10, 3) and torch.allclose(r.sum(-1), torch.ones(3, 10))
    assert ((r > 0).sum(-1) == 2).all()  # top_k = 2
    for i, p in enumerate(prompts):
        assert (batch_logits[i, -len(p) :] - logits(model, p[None])[0]).abs().max() <= 1e-4
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0
    )
    for i, p in enumerate(prompts):
        alone = model.generate(input_ids=p[None], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert out[i, ids.shape[1] :].tolist() == alone[0, len(p) :].tolist()


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_generate_modes(tmp_path, level):
    config, sd, _, _ = build("llama", "twin", level, top_k=None if level == "token" else 1)
    model = load(save(tmp_path / "m", config, sd))
    if level == "sequence":
        point_prototypes_at(model, prompts3())  # the two prompts take different routes
    ids, mask = left_pad(prompts3()[:2])
    kw = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 4, "pad_token_id": 0}
    torch.manual_seed(0)
    assert model.generate(**kw, do_sample=True, top_k=0).shape == (2, ids.shape[1] + 4)
    beams = model.generate(**kw, num_beams=2, do_sample=False)
    assert beams.shape == (2, ids.shape[1] + 4)
    if level == "sequence":
        r = model.last_routes()
        assert (
            r.shape == (4, 3) and torch.equal(r[0], r[1]) and torch.equal(r[2], r[3])
        )  # beams share a route
    seqs = model.generate(**kw, do_sample=True, num_return_sequences=2)
    assert seqs.shape == (4, ids.shape[1] + 4)
    beams2 = model.generate(**kw, num_beams=2, num_return_sequences=2, do_sample=False)
    assert beams2.shape == (4, ids.shape[1] + 4)
    if level == "sequence":
        r = model.last_routes()
        assert r.shape == (4, 3) and torch.equal(r[0], r[1]) and not torch.equal(r[1], r[2])
    else:
        assert all(v.shape[0] == 4 for v in model.last_routes().values())


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_uninitialized_router_is_uniform(tmp_path, level):
    config, sd, _, _ = build("llama", "bit1", level, initialized=False)
    routers = {k: sd.pop(k) for k in list(sd) if "moerge_router" in k}  # may be left out when uninitialised
    model, info = AutoModelForCausalLM.from_pretrained(
        save(tmp_path / "m", config, sd), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = ids_batch()
    out = logits(model, ids)
    routes = model.last_routes()
    for r in routes.values() if isinstance(routes, dict) else [routes]:
        assert torch.allclose(r, torch.full_like(r, 1 / 3))
    model.force_route({name: 1.0 for name in EXPERTS})
    assert (logits(model, ids) - out).abs().max() <= 1e-5
    # calibration in memory: set the router tensors and flip `initialized`
    model.force_route(None)
    model.load_state_dict(routers, strict=False)
    model.config.moerge["initialized"] = True
    logits(model, ids)
    routes = model.last_routes()
    for r in routes.values() if isinstance(routes, dict) else [routes]:
        assert ((r > 0).sum(-1) == 1).all()  # top_k = 1 again


@pytest.mark.parametrize("mode", ["soft", "shared"])
def test_fallback(tmp_path, mode):
    config, sd, base, _ = build("llama", "wemoe", "sequence", fallback={"threshold": 1.01, "mode": mode})
    model = load(save(tmp_path / "m", config, sd))
    ids = ids_batch(b=3)
    out = logits(model, ids)
    assert model.moerge_stats["fallback_rows"] == 3 and model.moerge_stats["routed_rows"] == 3
    r = model.last_routes()
    if mode == "shared":  # zero route: only W_s
        assert torch.equal(r, torch.zeros(3, 3))
        assert (out - logits(base, ids)).abs().max() <= 1e-5
    else:  # the untruncated softmax
        assert torch.allclose(r.sum(-1), torch.ones(3)) and ((r > 0).sum(-1) == 3).all()
    model.reset_moerge_stats()
    config.moerge["fallback"] = {"threshold": 0.0, "mode": mode}
    model = load(save(tmp_path / "n", config, sd))
    logits(model, ids)
    assert model.moerge_stats["fallback_rows"] == 0 and ((model.last_routes() > 0).sum(-1) == 1).all()


# ---------------------------------------------------------------------------------------------------------------
# (c) fresh process with moerge; (d) fresh process without moerge (remote code)
# ---------------------------------------------------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import sys, torch
    mode, out_file, *dirs = sys.argv[1:]
    if mode == "remote":
        exec(HIDE_MOERGE)
    else:
        from moerge.modeling import register
        register()
    from transformers import AutoModelForCausalLM
    ids = torch.arange(3, 10)[None]
    result = {}
    for d in dirs:
        model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=(mode == "remote")).eval()
        assert type(model).__name__ == "MoergeForCausalLM"
        assert (type(model).__module__ == "moerge.modeling.modeling_moerge") == (mode != "remote")
        with torch.no_grad():
            result[d] = {"logits": model(ids).logits,
                         "gen": model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)}
    torch.save(result, out_file)
    """
)


def run_child(tmp_path: Path, mode: str, dirs: list[Path]) -> dict:
    script, out = tmp_path / f"child_{mode}.py", tmp_path / f"out_{mode}.pt"
    script.write_text(f"HIDE_MOERGE = {HIDE_MOERGE!r}\n" + CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HOME=str(tmp_path / "hf"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    if mode == "remote":
        cmd, cwd = [sys.executable, "-I", str(script)], tmp_path
    else:
        cmd, cwd = [sys.executable, str(script)], tmp_path
        env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [*cmd, mode, str(out), *map(str, dirs)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def test_fresh_process_and_remote_code(tmp_path):
    ids = torch.arange(3, 10)[None]
    dirs, expected = [], {}
    for level, kind in (("sequence", "bit1"), ("token", "twin")):
        config, sd, _, _ = build("qwen2", kind, level)
        d = save(tmp_path / level, config, sd)
        model = load(d)
        with torch.no_grad():
            expected[str(d)] = (
                model(ids).logits,
                model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0),
            )
        dirs.append(d)
    for mode in ("package", "remote"):
        got = run_child(tmp_path, mode, dirs)
        for d in dirs:
            want_logits, want_gen = expected[str(d)]
            assert (got[str(d)]["logits"] - want_logits).abs().max() <= 1e-5, (mode, d)
            assert torch.equal(got[str(d)]["gen"], want_gen), (mode, d)
