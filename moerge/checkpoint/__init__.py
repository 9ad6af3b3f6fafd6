"""The checkpoint layer: how a built moerge folder is named, described, opened, indexed and edited.

* :mod:`.names` - the one spelling of every file and tensor name;
* :mod:`.manifest` - the typed ``config.json["moerge"]`` (:class:`Manifest`);
* :mod:`.routers` - router tensors (:class:`RouterTensors`) and the router shard;
* :mod:`.folder` - :class:`Checkpoint` (``Checkpoint.open(path)``: config, manifest, index, recipe, routers,
  model and tokenizer loading, always without running code from the folder);
* :mod:`.index` - the one index writer.
"""

from .folder import Checkpoint, load_model, read_config
from .manifest import Fallback, LinearSpec, Manifest, UnitSpec, Unknown
from .routers import RouterTensors, uniform_router

__all__ = ["Checkpoint", "Fallback", "LinearSpec", "Manifest", "RouterTensors", "UnitSpec", "Unknown", "load_model",
           "read_config", "uniform_router"]
