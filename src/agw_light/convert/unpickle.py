"""Reading a pickled whole `nn.Module` (a published re-id model saved with `torch.save(model)`) without its source
code and without running any code from the file.

A pickle is a little program: GLOBAL names a module attribute, REDUCE calls it, NEWOBJ builds an instance, BUILD
sets its state. A pickled `nn.Module` needs only the last two for its own classes (`modeling.baseline.Baseline`,
`torch.nn.modules.conv.Conv2d` ...): an instance of the class and its `__dict__`, where the tensors live
(`_parameters`, `_buffers`, `_modules`). So every class the file names becomes an inert stand-in that only stores
the state it is given (its real code is never imported), and the only callables are tensor rebuilders and plain
containers (`ALLOWED`). Calling anything else, which is how a crafted pickle runs code (`posix.system(...)`,
`builtins.eval(...)`), raises `UnsafePickleError` instead: the file is refused.

Use it as torch.load's pickle module: ``torch.load(f, weights_only=False, pickle_module=agw_light.convert.unpickle)``
(torch adds the storages and persistent ids of its format on top), then `module_state_dict` on the result.
"""

from __future__ import annotations

import collections
import pickle
from collections.abc import Callable
from typing import IO, Any

import torch


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle would call a function that is neither a tensor rebuilder nor a plain container."""


class UnreadValue:
    """A value the file holds outside the weights (a numpy scalar such as a recorded rank-1 score), not rebuilt."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __setstate__(self, state: Any) -> None:  # a numpy dtype's byte order and flags: not needed
        pass

    def __repr__(self) -> str:
        return f"<unread {self.what}>"


class _StandInType(type):
    """The type of stand-in classes: instantiating one by a call (REDUCE) is refused, since for an arbitrary global
    that call is exactly what running code from a pickle means."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError(f"the pickle calls {cls.__module__}.{cls.__qualname__}: it would run code")


class StandIn(metaclass=_StandInType):
    """An instance of a class the pickle names, holding only the state the pickle gives it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # never called (see _StandInType); lets NEWOBJ pass args
        raise UnsafePickleError("stand-ins are not initialised")

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (__dict__, slots) form
        object.__setattr__(self, "pickled_state", state)

    def __setitem__(self, key: Any, value: Any) -> None:  # a dict subclass's items
        self.__dict__.setdefault("pickled_items", {})[key] = value

    def append(self, value: Any) -> None:  # a list subclass's items
        self.__dict__.setdefault("pickled_list", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("pickled_list", []).extend(values)

    @property
    def pickled_class(self) -> str:
        return f"{type(self).__module__}.{type(self).__qualname__}"


_STAND_INS: dict[tuple[str, str], type] = {}


def _stand_in(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STAND_INS:
        _STAND_INS[key] = _StandInType(name, (StandIn,), {"__module__": module, "__qualname__": name})
    return _STAND_INS[key]


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg._reconstructor for protocol 0/1 pickles, limited to making a bare stand-in instance."""
    if not isinstance(cls, _StandInType) or base not in (object, dict, list):
        raise UnsafePickleError(f"the pickle reconstructs {cls!r} from {base!r}: it would run code")
    return object.__new__(cls)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: tuple, state: Any) -> Any:
    """torch's tensor-subclass rebuilder, for plain tensors and Parameters only (it calls `func`, so `func` is
    checked to be a tensor rebuilder)."""
    if func not in (torch._utils._rebuild_tensor_v2, torch._utils._rebuild_tensor) or new_type not in (
        torch.Tensor,
        torch.nn.Parameter,
    ):
        raise UnsafePickleError(f"the pickle rebuilds a tensor through {func!r} as {new_type!r}: refused")
    tensor = func(*args)
    return torch.nn.Parameter(tensor) if new_type is torch.nn.Parameter else tensor


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode`, as protocol-2 pickles write bytes (text, "latin1"), and for nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError(f"the pickle calls _codecs.encode({type(text).__name__}, {encoding!r}): refused")
    return text.encode("latin1")


def _unread(what: str) -> Callable[..., UnreadValue]:
    return lambda *args, **kwargs: UnreadValue(what)


ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "object"): object,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _latin1_bytes,
    # numpy scalars and dtypes appear beside the weights (torchreid records rank-1 as one); never needed here.
    ("numpy.core.multiarray", "scalar"): _unread("numpy scalar"),
    ("numpy._core.multiarray", "scalar"): _unread("numpy scalar"),
    ("numpy", "dtype"): _unread("numpy dtype"),
}
# Protocol 0-2 files written by Python 2 name the builtins and copyreg modules by their old names.
_PYTHON2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class Unpickler(pickle.Unpickler):
    """pickle.Unpickler whose globals are `ALLOWED` callables, torch dtypes, or inert stand-in classes."""

    def find_class(self, module: str, name: str) -> Any:
        module = _PYTHON2_MODULES.get(module, module)
        if (module, name) in ALLOWED:
            return ALLOWED[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _stand_in(module, name)


def load(file: IO[bytes], **kwargs: Any) -> Any:
    """pickle.load through `Unpickler` (torch's legacy format reads its header with the module's `load`)."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs: Any) -> Any:
    import io

    return load(io.BytesIO(data), **kwargs)


def module_state_dict(obj: StandIn, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state_dict a pickled `nn.Module` stand-in holds: parameters, persistent buffers, children, recursively,
    in `nn.Module.state_dict`'s order and naming."""
    state = getattr(obj, "pickled_state", None)
    if not isinstance(state, dict) or "_modules" not in state:
        raise ValueError(f"{obj!r} at {prefix or 'the top'} is not a pickled torch.nn.Module")
    weights: dict[str, torch.Tensor] = {}
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            weights[prefix + name] = value.detach()
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in non_persistent:
            weights[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            weights.update(module_state_dict(child, f"{prefix}{name}."))
    return weights


def is_module(obj: Any) -> bool:
    """Whether `obj` is a pickled `nn.Module` stand-in."""
    return (
        isinstance(obj, StandIn)
        and isinstance(getattr(obj, "pickled_state", None), dict)
        and ("_modules" in obj.pickled_state)
    )
