"""Encode nested state (dicts, lists, tuples, scalars, tensors, numpy arrays) as JSON + tensors.

Strategies, RNG states and data loaders hand the checkpoint opaque nested structures. Tensors
(and numpy arrays) inside them become checkpoint atoms; everything else stays inline in the
manifest as JSON. ``decode(encode(x)) == x`` for every supported value, including tuple vs list,
non-string dict keys, bytes and numpy arrays (Python's and numpy's RNG states round-trip).

Encoding (JSON):
    str, bool, int, float, None   themselves
    list                          a list
    dict with str keys            an object (keys starting with "__" are escaped via ``__dict__``)
    other dict                    ``{"__dict__": [[key, value], ...]}``
    tuple                         ``{"__tuple__": [...]}``
    bytes                         ``{"__bytes__": base64}``
    torch.Tensor                  ``{"__atom__": name}``
    numpy.ndarray                 ``{"__ndarray__": name}``   (stored as a tensor atom)
    numpy scalar                  its Python value
    torch.dtype                   ``{"__dtype__": "float32"}``
"""

from __future__ import annotations

import base64
from typing import Any, Callable

import numpy as np
import torch


def _escape(key: str) -> str:
    return key.replace("%", "%25").replace("/", "%2F")


def encode(tree: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(json_tree, {atom name: tensor})``; atom names are ``prefix/<path>`` with the path's
    keys joined by ``/``. Raises TypeError naming the path of an unsupported value."""
    tensors: dict[str, torch.Tensor] = {}

    def name_for(path: list[str]) -> str:
        name = "/".join([prefix, *path]) if path else prefix
        base, n = name, 1
        while name in tensors:
            n += 1
            name = f"{base}#{n}"
        return name

    def enc(value: Any, path: list[str]) -> Any:
        if isinstance(value, torch.Tensor):
            name = name_for(path)
            tensors[name] = value
            return {"__atom__": name}
        if isinstance(value, np.ndarray):
            name = name_for(path)
            tensors[name] = torch.from_numpy(np.ascontiguousarray(value))
            return {"__ndarray__": name}
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, (str, bool, int, float)):
            return value
        if isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, (bytes, bytearray)):
            return {"__bytes__": base64.b64encode(bytes(value)).decode()}
        if isinstance(value, (tuple, torch.Size)):
            return {"__tuple__": [enc(v, [*path, str(i)]) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [enc(v, [*path, str(i)]) for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: enc(v, [*path, _escape(k)]) for k, v in value.items()}
            return {"__dict__": [[enc(k, [*path, "key"]), enc(v, [*path, _escape(str(k))])] for k, v in value.items()]}
        where = "/".join([prefix, *path])
        raise TypeError(
            f"checkpoint state at {where!r} has a {type(value).__name__}, which a checkpoint cannot store; "
            "use tensors, numpy arrays, numbers, strings, bytes, lists, tuples and dicts"
        )

    return enc(tree, []), tensors


def atom_names(tree: Any) -> list[str]:
    """Every atom name referenced by an encoded tree."""
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "__atom__" in node or "__ndarray__" in node:
                out.append(node.get("__atom__") or node["__ndarray__"])
                return
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(tree)
    return out


def decode(tree: Any, load_tensor: Callable[[str], torch.Tensor]) -> Any:
    """The value :func:`encode` was given; ``load_tensor(name)`` supplies each atom."""

    def dec(node: Any) -> Any:
        if isinstance(node, list):
            return [dec(v) for v in node]
        if not isinstance(node, dict):
            return node
        if "__atom__" in node:
            return load_tensor(node["__atom__"])
        if "__ndarray__" in node:
            return load_tensor(node["__ndarray__"]).numpy()
        if "__tuple__" in node:
            return tuple(dec(v) for v in node["__tuple__"])
        if "__bytes__" in node:
            return base64.b64decode(node["__bytes__"])
        if "__dtype__" in node:
            return getattr(torch, node["__dtype__"])
        if "__dict__" in node:
            return {_hashable(dec(k)): dec(v) for k, v in node["__dict__"]}
        return {k: dec(v) for k, v in node.items()}

    return dec(tree)


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key
