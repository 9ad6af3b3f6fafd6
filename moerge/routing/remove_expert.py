"""``moerge remove-expert``: drop one expert (or composed route) from a built checkpoint, atomically.

An expert is dropped from every routed linear (its tensors ``P.experts.{e}.*`` go, later experts' tensors are
renumbered down by one, by byte copy: :mod:`moerge.checkpoint.rewrite`), from the manifest (``experts``, each
linear's ``experts`` list, each composed route's weights and anchors) and from the router (its prototype and bias row, and
its mean in the unknown-prompt detector).  A composed route is dropped from ``routes`` and the router.  Nothing
else changes: the shared weights stay as built, so forcing any remaining expert gives exactly the logits it gave
before, and the remaining router outputs keep their scores (the softmax renormalises over them).  ``data``
recalibrates the router afterwards, as ``moerge calibrate`` would.

The result equals a build without that expert wherever the shared weights do not depend on it (``shared:
base``, or units outside the static merge); with ``shared: merge`` a rebuild would also re-merge the shared
weights without it.  Atomic like add-expert: a hard-linked copy is edited beside the target and swapped in only
when complete; shards that change are written as new files.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, Manifest, names
from ..checkpoint.index import indexed_files, write_index
from ..checkpoint.rewrite import expert_renames, rewrite_shard
from ..checkpoint.routers import write_router_shard
from ..errors import DataError
from ..io.atomic import atomic_output
from ..io.index import read_safetensors_header
from ..registry import did_you_mean
from .calibrate import CalibrateOptions, calibrate
from .commit import link_copy
from .data import data_inputs


def check_removable(manifest: Manifest, name: str, folder: Path) -> None:
    """``name`` is an expert or composed route of the checkpoint, and not its last expert."""
    outputs = list(manifest.outputs)
    if name not in outputs:
        raise DataError(folder / names.CONFIG, "moerge.experts", f"no expert or route '{name}'"
                                                                 f"{did_you_mean(name, outputs)}; experts: "
                                                                 f"{', '.join(outputs)}")
    if name in manifest.experts and len(manifest.experts) == 1:
        raise DataError(folder / names.CONFIG, "moerge.experts", f"'{name}' is the checkpoint's last expert; a "
                                                                 "routed checkpoint needs at least one")
    if name in manifest.experts:
        users = manifest.anchored_on(manifest.experts.index(name))
        if users:
            raise DataError(folder / names.CONFIG, "moerge.anchors", f"expert(s) {', '.join(users)} were added "
                            f"against a combination that includes '{name}' (add-expert anchors); remove "
                            f"{', '.join(users)} first (and add it back after, if wanted)")


def renumber_shards(tmp: Path, src: Path, e: int) -> tuple[list[str], dict[str, int]]:
    """Rewrite, in ``tmp`` (a hard-linked copy of ``src``), every shard holding expert tensors of index >= e;
    returns the shard files left and counts (tensors dropped / renamed, bytes dropped, shards rewritten)."""
    files, stats = [], {"tensors_dropped": 0, "tensors_renamed": 0, "bytes_dropped": 0, "shards_rewritten": 0}
    for fname in indexed_files(tmp):
        header = read_safetensors_header(tmp / fname)
        renames = expert_renames(list(header), e) if fname != names.ROUTER_SHARD else {}
        if not renames:
            files.append(fname)
            continue
        dropped = [n for n, v in renames.items() if v is None]
        stats["tensors_dropped"] += len(dropped)
        stats["tensors_renamed"] += len(renames) - len(dropped)
        stats["bytes_dropped"] += sum(header[n].nbytes for n in dropped)
        (tmp / fname).unlink()  # a hard link to the source's shard: the new version is a new file
        if len(dropped) < len(header):
            rewrite_shard(src / fname, tmp / fname, renames)
            stats["shards_rewritten"] += 1
            files.append(fname)
    return files, stats


def drop_output(tmp: Path, ckpt: Checkpoint, name: str) -> dict[str, Any]:
    """Remove expert or route ``name`` in ``tmp`` (a hard-linked copy of the checkpoint)."""
    manifest = ckpt.require_routed()
    i = manifest.outputs.index(name)
    routers = {p: r.without(i) for p, r in ckpt.routers().items()}
    if name in manifest.routes:
        new, files, stats = manifest.without_route(name), indexed_files(tmp), {}
    else:
        _warn_routes(manifest, i)
        new = manifest.without_expert(i)
        files, stats = renumber_shards(tmp, ckpt.folder, i)
    (tmp / names.ROUTER_SHARD).unlink()
    order = write_router_shard(tmp / names.ROUTER_SHARD, routers, ckpt.router_dtype())
    write_index(tmp, files, {names.ROUTER_SHARD: order})
    config = ckpt.config_with(new)
    (tmp / names.CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    _forget_data(tmp / names.REPORT, name)
    card = tmp / names.CARD
    if card.is_file():
        card.write_text(card.read_text() + f"\n`{name}` removed with `moerge remove-expert`.\n")
    return {"removed": name, "what": "route" if name in manifest.routes else "expert", **stats}


def _warn_routes(manifest: Manifest, e: int) -> None:
    used = [r for r, per in manifest.routes.items() if any(w[e] != 0.0 for w in per.values())]
    if used:
        warnings.warn(f"composed route(s) {', '.join(used)} mixed in expert '{manifest.experts[e]}'; they keep "
                      "their other weights (recompose them with `moerge calibrate --compose`)", stacklevel=3)


def _forget_data(report: Path, name: str) -> None:
    """The last calibration's data, as later add-expert / calibrate runs reuse it, without ``name``'s source."""
    if not report.is_file():
        return
    try:
        raw = json.loads(report.read_text())
    except ValueError:
        return
    sources = (raw.get("data") or {}).get("sources")
    if isinstance(sources, dict) and name in sources:
        del sources[name]
        report.write_text(json.dumps(raw, indent=2) + "\n")


def remove_expert(checkpoint: str | Path, name: str, *, out: str | Path | None = None, force: bool = False,
                  data: str | Path | dict[str, Any] | None = None,
                  options: CalibrateOptions | None = None) -> dict[str, Any]:
    """Remove expert or composed route ``name`` from ``checkpoint`` (in place, or into ``out``); with ``data``,
    recalibrate the router afterwards.  Returns what was done (and the calibration report under
    ``calibration``)."""
    opts = options or CalibrateOptions()
    opts.check()
    ckpt = Checkpoint.open(checkpoint, routed=True)
    check_removable(ckpt.require_routed(), name, ckpt.folder)
    target = Path(out) if out is not None else ckpt.folder
    in_place = target.resolve() == ckpt.folder.resolve()
    inputs = [] if in_place else [("checkpoint", ckpt.folder), *(data_inputs(data) if data is not None else [])]
    with atomic_output(target, force=force or in_place, inputs=inputs) as tmp:
        link_copy(ckpt.folder, tmp)
        result = drop_output(tmp, ckpt, name)
        result["calibration"] = calibrate(tmp, data, options=opts) if data is not None else None
    result["checkpoint"] = str(target)
    return result
