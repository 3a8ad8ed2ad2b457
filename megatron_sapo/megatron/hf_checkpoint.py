"""Initial weights from a Hugging Face checkpoint, read shard by shard: each rank reads only the HF tensors of
the units (per-layer / per-expert tensors) it holds, one unit at a time.

The mapping is rollout/weights.megatron_to_hf, run on element ids: a unit filled with 0..n-1 and mapped
forward says, for every HF tensor, which unit elements it holds (megatron_to_hf only slices, splits and
reshapes). So loading is the exact inverse of the export, with no second hand-written map.

Every rank checks the checkpoint's names against the names the WHOLE model needs (from the config and the
per-layer shapes, names only), before it writes anything: all ranks raise the same error for a bad checkpoint.
Only tensor headers are read for that; tensor data is read lazily (safetensors.safe_open).
"""

from __future__ import annotations

import json
import os
import re

import torch

from megatron_sapo.config import ModelConfig
from megatron_sapo.megatron.weights import fill_units, shards_by_unit
from megatron_sapo.rollout.weights import megatron_to_hf

INDEX_FILE = "model.safetensors.index.json"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^(.*\.local_experts\.)(\d+)(\..+)$")


class HFCheckpointError(ValueError):
    """An HF checkpoint that does not fit the model; the message names the tensor(s) and the folder."""


class HFReader:
    """Lazy access to the tensors of an HF checkpoint folder (one or more *.safetensors files)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isdir(path):
            raise FileNotFoundError(f"HF checkpoint {path!r}: no such folder")
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"HF checkpoint {path!r}: no *.safetensors files in that folder")
        self._handles: dict[str, object] = {}
        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                self.file_of = dict(json.load(f)["weight_map"])
            absent = sorted(set(self.file_of.values()) - set(files))
            if absent:
                raise FileNotFoundError(f"HF checkpoint {path!r}: {INDEX_FILE} names files that are missing: {absent}")
        else:  # no index: the names come from each file's header
            self.file_of = {}
            for file in files:
                for name in self._open(file).keys():  # noqa: SIM118 (not a dict)
                    if name in self.file_of:
                        raise HFCheckpointError(
                            f"HF checkpoint {path!r}: tensor '{name}' is in both {self.file_of[name]} and {file}"
                        )
                    self.file_of[name] = file

    def _open(self, file: str):
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(os.path.join(self.path, file), framework="pt")
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        """From the file header; no data is read."""
        return tuple(self._open(self.file_of[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._open(self.file_of[name]).get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> HFReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def expected_units(local: dict[str, tuple], m: ModelConfig) -> dict[str, tuple | None]:
    """Every unit of the whole model -> its shape (None where this rank cannot tell), the same on every rank.

    Layers (and experts) are alike, so this rank's units of any layer give the units of every layer, with the
    layer and expert indices running over the config's counts; the top-level units are named from the config
    (a middle pipeline stage holds none of them)."""
    units: dict[str, tuple | None] = {}
    per_layer: dict[str, tuple] = {}
    for name, shape in local.items():
        match = _LAYER.match(name)
        if match is None:
            units[name] = shape
            continue
        rest = match.group(2)
        expert = _EXPERT.match(rest)
        per_layer[rest if expert is None else f"{expert.group(1)}{{e}}{expert.group(3)}"] = shape
    for layer in range(m.num_layers):
        for rest, shape in per_layer.items():
            experts = range(m.num_experts) if "{e}" in rest else [None]
            for e in experts:
                units[f"decoder.layers.{layer}." + (rest if e is None else rest.replace("{e}", str(e)))] = shape
    top = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    for name in top + ([] if m.tie_embeddings else ["output_layer.weight"]):
        units.setdefault(name, None)
    return units


def expected_hf_names(units: dict[str, tuple | None], m: ModelConfig) -> dict[str, tuple | None]:
    """HF name -> shape (None if unknown) for all units, from names and shapes only (meta tensors)."""
    out: dict[str, tuple | None] = {}
    for name, shape in units.items():
        mapped = megatron_to_hf({name: torch.empty(shape if shape is not None else (0,), device="meta")}, m)
        for hf_name, tensor in mapped.items():
            out[hf_name] = tuple(tensor.shape) if shape is not None else None
    return out


def _check(reader: HFReader, expected: dict[str, tuple | None], m: ModelConfig) -> None:
    have = reader.names()
    missing = sorted(set(expected) - have)
    if missing:
        raise HFCheckpointError(
            f"HF checkpoint {reader.path!r} lacks {len(missing)} tensor(s) the model needs: {missing[:5]}"
        )
    unexpected = sorted(have - set(expected) - ({"lm_head.weight"} if m.tie_embeddings else set()))
    if unexpected:
        raise HFCheckpointError(
            f"HF checkpoint {reader.path!r} has {len(unexpected)} tensor(s) the model does not use "
            f"(does model.* match the checkpoint's config.json?): {unexpected[:5]}"
        )
    for name, shape in expected.items():
        if shape is not None:
            _check_shape(reader, name, shape)


def _check_shape(reader: HFReader, name: str, shape: tuple) -> None:
    got = reader.shape(name)
    if got != tuple(shape):
        raise HFCheckpointError(
            f"HF checkpoint {reader.path!r}: tensor '{name}' has shape {got}, the model needs {tuple(shape)}"
        )


def _read_unit(reader: HFReader, unit: str, shape: tuple, dtype: torch.dtype, m: ModelConfig) -> torch.Tensor:
    """One whole unit, rebuilt from the HF tensors it maps to."""
    numel = torch.Size(shape).numel()
    ids = torch.arange(numel, dtype=torch.int32 if numel < 2**31 else torch.int64).view(shape)
    parts = megatron_to_hf({unit: ids}, m)
    del ids
    if not parts:
        raise HFCheckpointError(f"Megatron weight '{unit}' maps to no HF tensor (model.tie_embeddings?)")
    flat = torch.empty(numel, dtype=dtype)
    covered = 0
    for name, index in parts.items():
        _check_shape(reader, name, tuple(index.shape))
        flat[index.reshape(-1)] = reader.get(name).reshape(-1).to(dtype)
        covered += index.numel()
    if covered != numel:  # megatron_to_hf partitions a unit; anything else is a mapping bug
        raise HFCheckpointError(f"Megatron weight '{unit}': HF tensors {sorted(parts)} cover {covered} of {numel}")
    return flat.view(shape)


def load_hf_checkpoint(chunks: list, path: str, m: ModelConfig) -> int:
    """Set this rank's parameter shards (every replica) from the HF checkpoint folder `path`; returns the
    number of shards written. Validates the whole checkpoint first: a bad one changes no weight."""
    grouped = shards_by_unit(chunks)
    with HFReader(path) as reader:
        _check(reader, expected_hf_names(expected_units({u: s for u, (s, _) in grouped.items()}, m), m), m)
        return fill_units(grouped, lambda unit, shape, dtype: _read_unit(reader, unit, shape, dtype, m))
