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
