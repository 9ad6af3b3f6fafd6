"""Synthetic model pools for the scale benchmarks: a base and N "fine-tunes" of a llama / mistral shape, written as
Hugging Face folders (``config.json`` + safetensors shards + ``model.safetensors.index.json``) without ever holding
a whole model in RAM.

Not a benchmark (``bench/scale.py`` uses it).  Design choices:

* **Header first, data streamed.**  Every output spec (names, shapes, dtype) is known up front, so each shard's
  header is written before its data and tensors are written in row blocks of about ``BLOCK_ELEMS`` values.
  The base and every expert are written in lock-step (same layout, same shard cuts): each base row block is drawn
  once and reused for every expert, so generation costs one Gaussian draw per base value plus the deltas.
* **Real or sparse.**  ``sparse=True`` writes the headers and leaves the data region a hole (``truncate``): a
  70B x 8 pool takes a few MB of disk, enough for anything that reads headers only (``moerge plan``).
* **Deltas with a controllable spectrum** (:class:`DeltaSpec`): expert e's delta of a matrix (O, I) is
  ``U_e diag(s) V_e + noise`` with U_e (O, k), V_e (k, I) Gaussian, ``s_j ~ j^-decay`` scaled so that the low-rank
  part has per-entry RMS ``scale``, plus i.i.d. noise of RMS ``noise`` (full rank, flat): the shape of a real
  fine-tune's task vector (a few strong directions over a slowly decaying floor).  1-D tensors (norms) get noise.
* **Seeded per (seed, tensor, expert, block)**: the same arguments write the same bytes.

Shapes: :data:`PRESETS` (the 114M / 347M llamas of the older benches with their 512-token vocabulary,
TinyLlama-1.1B, OpenLLaMA-3B, Mistral-7B, Llama-3-70B) and :func:`layer_shape`
(one decoder layer of a preset with a tiny vocabulary).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

BLOCK_ELEMS = 1 << 24  # values per generated row block (64 MiB of fp32)
ST_CODES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass(frozen=True)
class ModelShape:
    """A llama-family decoder (llama or mistral naming and config)."""

    name: str
    family: str  # "llama" | "mistral"
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie: bool = False
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_tensors(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        """Decoder layer ``i``'s tensors in state-dict order, (out, in) for linears."""
        h, kv, p = self.hidden, self.kv_heads * self.head_dim, f"model.layers.{i}"
        return [(f"{p}.self_attn.q_proj.weight", (self.heads * self.head_dim, h)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)), (f"{p}.self_attn.v_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, self.heads * self.head_dim)),
                (f"{p}.mlp.gate_proj.weight", (self.intermediate, h)), (f"{p}.mlp.up_proj.weight", (self.intermediate, h)),
                (f"{p}.mlp.down_proj.weight", (h, self.intermediate)),
                (f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor of the checkpoint, in state-dict order."""
        out = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            out += self.layer_tensors(i)
        out.append(("model.norm.weight", (self.hidden,)))
        if not self.tie:
            out.append(("lm_head.weight", (self.vocab, self.hidden)))
        return out

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def largest_tensor(self) -> int:
        """Elements of the largest tensor (what one streaming job holds per input)."""
        return max(math.prod(s) for _, s in self.tensors())

    def config(self, dtype: torch.dtype = torch.bfloat16) -> dict:
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[self.family]
        cfg = {"architectures": [arch], "model_type": self.family, "hidden_size": self.hidden,
               "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
               "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
               "vocab_size": self.vocab, "hidden_act": "silu", "max_position_embeddings": 4096,
               "rms_norm_eps": 1e-5, "rope_theta": self.rope_theta, "tie_word_embeddings": self.tie,
               "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": str(dtype).replace("torch.", "")}
        if self.family == "llama":
            cfg.update(attention_bias=False, mlp_bias=False)
        else:
            cfg["sliding_window"] = None
        return cfg


PRESETS: dict[str, ModelShape] = {s.name: s for s in (
    ModelShape("tiny", "llama", 256, 688, 4, 4, 4, 512),
    ModelShape("27m", "llama", 512, 1536, 8, 8, 8, 512),
    ModelShape("114m", "llama", 768, 3072, 12, 12, 12, 512),  # bench/merge_speed's ~110M llama, tiny vocab
    ModelShape("347m", "llama", 1024, 3328, 24, 16, 16, 512),  # bench/build_memory's ~350M llama
    ModelShape("1b", "llama", 2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B
    ModelShape("3b", "llama", 3200, 8640, 26, 32, 32, 32000),  # OpenLLaMA-3B
    ModelShape("mistral-7b", "mistral", 4096, 14336, 32, 32, 8, 32000),
    ModelShape("llama3-70b", "llama", 8192, 28672, 80, 64, 8, 128256, rope_theta=500000.0),
)}


def layer_shape(preset: str | ModelShape, layers: int = 1, vocab: int = 256) -> ModelShape:
    """``layers`` decoder layers of ``preset`` with a ``vocab``-token embedding: per-layer costs at real shapes."""
    shape = PRESETS[preset] if isinstance(preset, str) else preset
    return dataclasses.replace(shape, name=f"{shape.name}-{layers}layer", layers=layers, vocab=vocab)


@dataclass(frozen=True)
class DeltaSpec:
    """Expert deltas: rank-``rank`` part with ``s_j ~ j^-decay`` (per-entry RMS ``scale``) + noise (RMS ``noise``)."""

    rank: int = 64
    decay: float = 1.0
    scale: float = 2e-3
    noise: float = 5e-4

    def singular_profile(self) -> torch.Tensor:
        """(rank,) weights s_j, normalised so that the Gaussian-factor product has per-entry RMS ``scale``."""
        s = torch.arange(1, self.rank + 1, dtype=torch.float32) ** -self.decay
        return s * (self.scale / float(s.norm()))


# ------------------------------------------------------------------------------------------------ values


def _gen(seed: int, *key: object) -> torch.Generator:
    digest = hashlib.sha256(":".join(map(str, (seed, *key))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _rows_per_block(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) == 1 else max(1, BLOCK_ELEMS // shape[1])


def tensor_blocks(name: str, shape: tuple[int, ...], n_experts: int, delta: DeltaSpec, seed: int,
                  base_std: float = 0.02) -> Iterator[list[torch.Tensor]]:
    """Row blocks of one tensor: each item is [base block, expert 0 block, ...] in fp32 (never the whole tensor)."""
    if len(shape) == 1:  # norms: ones, experts + noise
        base = torch.ones(shape)
        yield [base] + [base + delta.noise * torch.randn(shape, generator=_gen(seed, name, e)) for e in range(n_experts)]
        return
    rows, cols = shape
    s = delta.singular_profile()  # (k,)
    vs = [torch.randn(delta.rank, cols, generator=_gen(seed, name, e, "V")) for e in range(n_experts)]  # (k, I) each
    step = _rows_per_block(shape)
    for b, start in enumerate(range(0, rows, step)):
        n = min(step, rows - start)
        base = torch.randn(n, cols, generator=_gen(seed, name, "base", b)).mul_(base_std)  # (n, I)
        out = [base]
        for e in range(n_experts):
            u = torch.randn(n, delta.rank, generator=_gen(seed, name, e, "U", b))  # (n, k)
            blk = torch.addmm(base, u * s, vs[e])  # (n, k) @ (k, I) -> (n, I)
            if delta.noise:
                blk.add_(torch.randn(n, cols, generator=_gen(seed, name, e, "N", b)), alpha=delta.noise)
            out.append(blk)
        yield out


# ------------------------------------------------------------------------------------------------ files


def shard_layout(tensors: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_size: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy cut in state-dict order, as ``save_pretrained(max_shard_size=...)`` does."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and used + nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    return shards


def safetensors_header(tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> tuple[bytes, int]:
    """(8-byte length + JSON header padded to 8 bytes, data bytes)."""
    item = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        n = math.prod(shape) * item
        header[name] = {"dtype": ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offset


def _write_block(f: BinaryIO, t: torch.Tensor, dtype: torch.dtype) -> None:
    f.write(memoryview(t.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy()))


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


@dataclass(frozen=True)
class Pool:
    """Where a written pool lives."""

    root: Path
    base: Path
    experts: list[Path]
    shape: ModelShape
    dtype: torch.dtype

    @property
    def folders(self) -> list[Path]:
        return [self.base, *self.experts]

    def model_bytes(self) -> int:
        return self.shape.n_params * torch.empty((), dtype=self.dtype).element_size()


def write_pool(root: Path, shape: ModelShape, n_experts: int, *, dtype: torch.dtype = torch.bfloat16,
               delta: DeltaSpec = DeltaSpec(), seed: int = 0, shard_size: int = 5 * 10**9,
               sparse: bool = False) -> Pool:
    """Write ``root/base`` and ``root/expert_{i}`` (config, shards, index); the data is a hole when ``sparse``."""
    folders = [root / "base", *(root / f"expert_{i}" for i in range(n_experts))]
    item = torch.empty((), dtype=dtype).element_size()
    shards = shard_layout(shape.tensors(), item, shard_size)
    names = shard_names(len(shards))
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(shape.config(dtype), indent=2) + "\n")
    for shard, fname in zip(shards, names):
        header, data_len = safetensors_header(shard, dtype)
        files = [open(folder / fname, "wb") for folder in folders]  # noqa: SIM115 - closed below
        try:
            for f in files:
                f.write(header)
                if sparse:
                    f.truncate(len(header) + data_len)
            if not sparse:
                for name, tshape in shard:
                    for blocks in tensor_blocks(name, tshape, n_experts, delta, seed):
                        for f, blk in zip(files, blocks):
                            _write_block(f, blk, dtype)
        finally:
            for f in files:
                f.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": shape.n_params * item},
                 "weight_map": {n: names[i] for i, shard in enumerate(shards) for n, _ in shard}}
        for folder in folders:
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return Pool(root, folders[0], folders[1:], shape, dtype)


def pool_disk_bytes(shape: ModelShape, n_models: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes that ``n_models`` real (non-sparse) checkpoints of ``shape`` take on disk (headers ignored)."""
    return shape.n_params * torch.empty((), dtype=dtype).element_size() * n_models
