"""Int8 weights held once: in oneDNN's packed (blocked) layout while the model runs, as plain int8 codes whenever
anything outside the kernels asks for them.

oneDNN's int8 conv/linear read their weight from a packed copy (`qconv_prepack` / `qlinear_prepack`); keeping
the plain int8 buffer beside it held every weight twice (34 MiB each on the ch-128 DDPM UNet). A module with this
mixin drops its plain `weight` buffer once a pack reorders back (`to_dense`) to exactly the same codes: checked
per weight when packing, so a machine whose packs do not round-trip keeps both copies instead of wrong weights.
The codes come back, unpacked, for `state_dict` (so fxq.save and state_dict see int8 weights as int8), for
`module.weight`, pickling and deepcopy, and the buffer is restored before derived state is dropped (`.to()`,
`load_state_dict`, new output parameters). `named_buffers()` does not list the weight while it is held packed.

The host class keeps its packs in `self._derived` (x86_ops._Lazy), registers an int8 `weight` buffer, and
says where its packs are (`_held_packs`) and how one unpacks (`_unpack`).
"""

from __future__ import annotations

import torch

from fxq.errors import FxqError


class PackedWeight:
    """Mixin (before nn.Module in the MRO) for a module whose int8 `weight` buffer is packed for oneDNN."""

    _fxq_state_tensors = ("weight",)  # in state_dict whether held plain or packed (what fxq.save asks)

    def _held_packs(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def _unpack(self, pack: torch.Tensor) -> torch.Tensor:
        """The plain int8 weight a pack holds (oneDNN reorders it back; no arithmetic)."""
        raise NotImplementedError

    def _codes(self) -> torch.Tensor:
        """The int8 weight codes: the buffer, or unpacked from a held pack once the buffer was released."""
        weight = self._buffers.get("weight")
        return weight if weight is not None else self._codes_from_packs()

    def _adopt(self, pack: torch.Tensor) -> torch.Tensor:
        """Release the plain buffer if `pack` holds exactly its codes; returns pack."""
        weight = self._buffers.get("weight")
        if weight is not None and torch.equal(self._unpack(pack), weight):
            del self._buffers["weight"]
        return pack

    def _restore_weight(self) -> None:
        """Put the plain buffer back (in its place, first among the buffers) before the packs go."""
        if "weight" not in self._buffers and self.__dict__.get("_derived") is not None:
            rest = dict(self._buffers)
            self._buffers.clear()
            self._buffers["weight"] = self._codes_from_packs()
            self._buffers.update(rest)

    def _codes_from_packs(self) -> torch.Tensor:
        packs = self._held_packs() if self.__dict__.get("_derived") is not None else []
        if not packs:
            raise FxqError(f"{type(self).__name__} holds neither its int8 weight nor a pack of it: its derived "
                           "state was dropped without restoring the weight (a bug in fxq)")
        return self._unpack(packs[0])

    def __getattr__(self, name: str):
        # reached whenever normal lookup fails, buffers included: unpack only once the buffer was released
        d = self.__dict__
        if name == "weight" and "weight" not in d.get("_buffers", {}) and d.get("_derived") is not None:
            return self._codes_from_packs()
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if "weight" in self._buffers:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        self._restore_weight()  # for this call only: the unpacked codes are a fresh copy
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            del self._buffers["weight"]

    def _load_from_state_dict(self, *args, **kwargs):
        self._restore_weight()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._restore_weight()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        """Pickling and deepcopy: the plain weight, no packs (oneDNN's opaque tensors have no storage to copy)."""
        state = super().__getstate__()
        if "weight" not in self._buffers and self.__dict__.get("_derived") is not None:
            state["_buffers"] = {"weight": self._codes_from_packs(), **self._buffers}
        state["_derived"] = None
        return state
