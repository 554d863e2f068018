"""Mamba-2 SSD. The public function is `backends.ssd(...)` (backends/ssd/op.py).

The function shares its name with this package: once any module of the package is imported, Python binds
`backends.ssd` to the package, not to the function that backends/__init__.py resolves lazily. So the package
itself is made callable, forwarding to the function; `backends.ssd(...)` works either way.
"""
import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from backends.ssd.op import ssd

        return ssd(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
