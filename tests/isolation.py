"""A preamble for child processes that must not see the moerge package (remote-code tests).

An editable or regular install puts moerge on every interpreter's path, so ``python -I`` alone is not
enough: the preamble drops editable finders and path entries that hold a ``moerge`` folder, then blocks
any remaining way to import it, and checks that ``import moerge`` fails.
"""

HIDE_MOERGE = '''
import importlib.abc, importlib.util, os, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path[:] = [p for p in sys.path if "editable" not in p and not os.path.isdir(os.path.join(p or ".", "moerge"))]
sys.path_importer_cache.clear()
class _NoMoerge(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "moerge" or name.startswith("moerge."):
            raise ModuleNotFoundError("moerge is hidden in this process")
        return None
sys.meta_path.insert(0, _NoMoerge())
try:
    import moerge  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("moerge is importable in the remote-code process")
'''

FORCED_LOGITS_AND_GENERATE = HIDE_MOERGE + '''
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
m.force_route(sys.argv[4])
ids = torch.load(sys.argv[2])
torch.save(m(input_ids=ids).logits.detach(), sys.argv[3])
m.force_route(None)
g = m.generate(ids, max_new_tokens=4, do_sample=False)
assert g.shape == (1, ids.shape[1] + 4), g.shape
'''


def fresh_process_logits(folder, ids, route: str, tmp_path):
    """Load ``folder`` with remote code in a fresh interpreter that cannot import moerge, force ``route``, return
    its logits on ``ids`` (and check that it generates 4 tokens unforced)."""
    import subprocess
    import sys

    import torch

    torch.save(ids, tmp_path / "ids.pt")
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-I", "-c", FORCED_LOGITS_AND_GENERATE, str(folder), str(tmp_path / "ids.pt"),
                    str(tmp_path / "got.pt"), route], check=True, cwd=tmp_path, env=env)
    return torch.load(tmp_path / "got.pt")
