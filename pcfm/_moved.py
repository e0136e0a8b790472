"""Old import paths kept for one release (0.2) after the verbs moved into :mod:`pcfm.api`."""
from __future__ import annotations

import importlib
import sys
import types
import warnings


class _CallableModule(types.ModuleType):
    """A module that calls its verb: importing the old module ``pcfm.generate`` rebinds the
    package attribute ``pcfm.generate`` to the module, and calls of it must still work."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self._pcfm_verb)(*args, **kwargs)


def moved(old: str, new: str, verb: str | None = None) -> None:
    """Make module ``old`` an alias of ``new`` (its public names), warning once on import."""
    warnings.warn(f"{old} is deprecated and will be removed in pcfm 0.3; import from {new} "
                  f"(or use the top-level names pcfm.pretrain / finetune / generate / evaluate)",
                  DeprecationWarning, stacklevel=3)
    target, module = importlib.import_module(new), sys.modules[old]
    for name in getattr(target, "__all__", None) or [n for n in vars(target) if not n.startswith("_")]:
        setattr(module, name, getattr(target, name))
    if verb is not None:
        module._pcfm_verb = verb
        module.__class__ = _CallableModule
