"""Offline builders of tiny models, tokenizers, experts and data for tests, demos and benchmarks.

Nothing here touches the network.  :func:`make_tokenizer` trains a small byte-level BPE tokenizer in
code (any text can be encoded), :func:`make_base` random-initialises a small causal LM of a supported
family, :func:`make_full_expert` and :func:`make_lora_expert` derive seeded "fine-tunes" of a base
(a full checkpoint with noise added, and a real PEFT LoRA adapter with non-zero ``lora_B``),
:func:`make_task_data` writes synthetic, clearly separable calibration prompts, and :func:`make_pool`
puts it all together under one folder.  Every builder is deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, IM_START, EOS_TOKEN, PAD_TOKEN)
TOKENIZER_VOCAB = 512

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
_GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3_text")


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


TASK_WORDS: dict[str, tuple[str, ...]] = {
    "sentiment": _words(
        "good bad great terrible movie film review loved hated boring amazing awful acting plot actor scene"
        " excellent worst best enjoyed fun wonderful disappointing recommend stars cinema director ending"
    ),
    "topic": _words(
        "news government election market economy minister president sports team match league stocks policy"
        " report city country weather storm parliament company shares trade police crisis summit vote"
    ),
    "math": _words(
        "what is plus minus times divided by equals sum product number add subtract multiply solve compute"
        " total half twice square root of and result"
    ),
    "code": _words(
        "python function class variable loop return list dict import compile bug error string integer array"
        " def print module test debug api json file parse recursion lambda git code"
    ),
}
_TASK_PREFIXES: dict[str, tuple[str, ...]] = {
    "sentiment": ("Review:", "What I thought of the film:", "Is this review positive?"),
    "topic": ("Headline:", "Classify this news:", "Breaking news:"),
    "math": ("Question:", "Compute:", "Solve this:"),
    "code": ("Write code:", "Fix this program:", "Explain the code:"),
}
TASKS = tuple(TASK_WORDS)

_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "A small model can still say hello to the world and answer a question.",
    "Once upon a time there was a little robot who wanted to learn how to read and write.",
    "She went to the market in the morning and bought some bread, milk, apples and cheese.",
    "We are going to the park this afternoon because the weather is nice and warm.",
    "The teacher asked the students to open their books and read the first chapter aloud.",
    "In the evening they sat by the fire, talked about their day and laughed together.",
    "Please write a short story about a cat, a dog and a bird who become friends.",
    "The assistant answers the user politely, clearly and with helpful information.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 11 12 20 42 100 and 1000 appear in text.",
    "Hello! How are you today? I am fine, thank you. What would you like to do?",
    "The system prompt tells the assistant who it is and how it should behave.",
)


def _training_corpus() -> list[str]:
    lines = list(_CORPUS)
    for task, words in TASK_WORDS.items():
        lines.extend(f"{prefix} {' '.join(words)}" for prefix in _TASK_PREFIXES[task])
    return lines * 4


def _train_bpe(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    return tok


def make_tokenizer(
    out_dir: str | Path | None = None, vocab_size: int = TOKENIZER_VOCAB
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ChatML special tokens; save it to ``out_dir`` if given."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(vocab_size),
        bos_token=BOS_TOKEN,
        unk_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        padding_side="left",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out_dir))
    return tok


def _init_std(hidden: int) -> float:
    return min(0.1, max(0.02, 0.5 / hidden**0.5))


def _family_kwargs(family: str, hidden: int, heads: int, max_position: int) -> dict[str, Any]:
    head_dim = hidden // heads
    kwargs: dict[str, Any] = {"head_dim": head_dim}
    if family == "mistral":
        kwargs["sliding_window"] = max_position
    if family in ("gemma2", "gemma3_text"):
        kwargs["query_pre_attn_scalar"] = head_dim
        kwargs["sliding_window"] = max_position // 2
    return kwargs


def _make_config(
    family: str,
    hidden: int,
    layers: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    tie: bool,
    max_position: int,
    tok: PreTrainedTokenizerFast,
) -> Any:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    config = AutoConfig.for_model(
        family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position,
        tie_word_embeddings=tie,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **_family_kwargs(family, hidden, heads, max_position),
    )
    if family == "gemma3_text":
        config.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return config


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int, std: float, gemma: bool) -> None:
    """Seeded re-init: matrices N(0, std), biases N(0, std), norm weights around 1 (Gemma: around 0)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if param.ndim == 1 and "norm" in name:
            center = 0.0 if gemma else 1.0
            param.copy_(center + 0.1 * noise)
        else:
            param.copy_(std * noise)


def make_base(
    out_dir: str | Path,
    family: str = "llama",
    hidden: int = 32,
    layers: int = 2,
    intermediate: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int | None = None,
    tie: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_position: int = 256,
    max_shard_size: int | str | None = None,
) -> Path:
    """Random-initialise a tiny causal LM of ``family`` and save it (with tokenizer) to ``out_dir``."""
    out = Path(out_dir)
    tok = make_tokenizer(out)
    vocab = len(tok) if vocab is None else vocab
    intermediate = 2 * hidden if intermediate is None else intermediate
    config = _make_config(
        family, hidden, layers, intermediate, heads, kv_heads, vocab, tie, max_position, tok
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed, _init_std(hidden), family in _GEMMA_FAMILIES)
    model = model.to(dtype)
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    save_kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(out), **save_kwargs)
    return out


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    return files


def _copy_side_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy2(path, dst / path.name)


def _tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _perturb(tensor: torch.Tensor, name: str, seed: int, scale: float) -> torch.Tensor:
    work = tensor.float()
    ref = float(work.std()) if work.numel() > 1 else 0.0
    if ref == 0.0:
        ref = max(float(work.abs().mean()), 1.0)
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    noise = torch.randn(work.shape, generator=gen, dtype=torch.float32)
    return (work + scale * ref * noise).to(tensor.dtype)


def _selected(name: str, modules: Iterable[str] | None) -> bool:
    return modules is None or any(m in name for m in modules)


def make_full_expert(
    base_dir: str | Path,
    out_dir: str | Path,
    seed: int,
    scale: float = 0.02,
    modules: Sequence[str] | None = None,
) -> Path:
    """Write a full checkpoint: the base plus seeded noise of ``scale * std(tensor)``.

    Only tensors whose name contains one of ``modules`` are changed when ``modules`` is given.  The file
    layout (single file or shards with their index), config, generation config and tokenizer are kept.
    """
    base, out = Path(base_dir), Path(out_dir)
    _copy_side_files(base, out)
    for path in _weight_files(base):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensor = f.get_tensor(name)
                tensors[name] = _perturb(tensor, name, seed, scale) if _selected(name, modules) else tensor
        save_file(tensors, str(out / path.name), metadata=metadata)
    return out


@torch.no_grad()
def _randomize_lora(model: torch.nn.Module, seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if "lora_A" in name or "lora_B" in name:
            param.copy_(scale * torch.randn(param.shape, generator=gen, dtype=torch.float32))


def make_lora_expert(
    base_dir: str | Path,
    out_dir: str | Path,
    seed: int,
    r: int = 4,
    alpha: int = 8,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    use_rslora: bool = False,
    fan_in_fan_out: bool = False,
    scale: float = 0.05,
) -> Path:
    """Save a real PEFT LoRA adapter of the base with seeded random (non-zero) ``lora_A`` and ``lora_B``.

    Note: PEFT resets ``fan_in_fan_out`` to False (with a warning) for ``nn.Linear`` targets, which are
    all a supported family has, so the saved ``adapter_config.json`` then says False.
    """
    from peft import LoraConfig, get_peft_model

    base, out = Path(base_dir).resolve(), Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0, bias="none",
                        use_rslora=use_rslora, fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5: is_gradient_checkpointing
        peft_model = get_peft_model(model, config)
    _randomize_lora(peft_model, seed, scale)
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    peft_model.save_pretrained(str(out))
    return out


def _math_token(rng: random.Random, words: Sequence[str]) -> str:
    return str(rng.randint(0, 99)) if rng.random() < 0.4 else rng.choice(words)


def make_prompt(task: str, rng: random.Random) -> str:
    """One synthetic prompt of 5-20 words for ``task`` (a key of :data:`TASK_WORDS`)."""
    words = TASK_WORDS[task]
    prefix = rng.choice(_TASK_PREFIXES[task])
    n_words = rng.randint(5, 20) - len(prefix.split())
    if task == "math":
        body = [_math_token(rng, words) for _ in range(n_words)]
    else:
        body = [rng.choice(words) for _ in range(n_words)]
    return f"{prefix} {' '.join(body)}"


def make_task_data(out_path: str | Path, task: str, n: int = 32, seed: int = 0) -> Path:
    """Write ``n`` JSONL rows ``{"prompt": ..., "task": task}`` of synthetic prompts for ``task``."""
    if task not in TASK_WORDS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}:{task}")
    rows = [json.dumps({"prompt": make_prompt(task, rng), "task": task}) for _ in range(n)]
    out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


def make_pool(
    root: str | Path,
    family: str = "llama",
    n_full: int = 2,
    n_lora: int = 1,
    tie: bool = False,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    n_data: int = 32,
) -> dict[str, Any]:
    """Build a base, ``n_full`` full experts, ``n_lora`` LoRA experts and one data file per expert's task.

    Returns ``{"root", "base", "family", "tie", "full": [paths], "lora": [paths],
    "experts": {name: path}, "tasks": {name: task}, "data": {task: path}}``; the expert names are
    ``expert_{i}`` and ``lora_{i}`` (also their folder names) and tasks cycle through :data:`TASKS`.
    """
    root = Path(root)
    base = make_base(root / "base", family=family, hidden=hidden, layers=layers, tie=tie, seed=seed)
    full = [make_full_expert(base, root / f"expert_{i}", seed=seed + 1 + i) for i in range(n_full)]
    lora = [make_lora_expert(base, root / f"lora_{i}", seed=seed + 101 + i) for i in range(n_lora)]
    experts = {p.name: p for p in [*full, *lora]}
    tasks = {name: TASKS[i % len(TASKS)] for i, name in enumerate(experts)}
    data = {
        t: make_task_data(root / "data" / f"{t}.jsonl", t, n_data, seed)
        for t in dict.fromkeys(tasks.values())
    }
    return {
        "root": root,
        "base": base,
        "family": family,
        "tie": tie,
        "full": full,
        "lora": lora,
        "experts": experts,
        "tasks": tasks,
        "data": data,
    }
