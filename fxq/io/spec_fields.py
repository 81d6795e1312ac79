"""The fxq_spec protocol of fxq.save for modules rebuilt from their constructor arguments alone."""

from __future__ import annotations

from fxq.errors import InputError


class SpecFields:
    """fxq_spec/from_fxq_spec over the constructor arguments each subclass lists in `_spec_fields`."""

    _spec_fields: tuple[str, ...] = ()

    def fxq_spec(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                ((k, getattr(self, k)) for k in self._spec_fields)}

    @classmethod
    def from_fxq_spec(cls, spec: dict):
        unknown = set(spec) - set(cls._spec_fields)
        if unknown:
            raise InputError(f"{cls.__name__} spec has unknown fields {sorted(unknown)}")
        return cls(**spec)
