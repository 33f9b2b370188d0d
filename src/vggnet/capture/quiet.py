"""Optional packages and the noise around them: importing torchao / ONNX Runtime with a clear error when one is
missing, and holding back warnings and log lines from torch, torchao and Inductor that a user cannot act on.

Each silencer is scoped to the call that causes the noise (``Logger.setLevel`` clears every logger's cache, and a
global filter would hide warnings from the user's own code).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from collections.abc import Iterator
from types import ModuleType

from vggnet.errors import VggnetError

__all__ = ["MissingDependency", "import_optional", "quiet_compiler_probe", "quiet_logger", "quiet_lowering",
           "quiet_torchao"]


class MissingDependency(VggnetError, RuntimeError):
    """An optional package that is not installed; the message names the vggnet extra that provides it."""


@contextlib.contextmanager
def quiet_logger(name: str, active: bool = True) -> Iterator[None]:
    """Logger ``name`` at ERROR for the duration of the block."""
    if not active:
        yield
        return
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def import_optional(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` ("``what`` needs X: pip install 'vggnet[extra]'").

    torchao 0.18's import logs a warning from torch's pytree module (an Enum registered the pre-2.14 way); it is
    held back for the import only."""
    with quiet_logger("torch.utils._pytree"):
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            raise MissingDependency(f"{what} needs {module.split('.')[0]}: pip install 'vggnet[{extra}]'") from exc


@contextlib.contextmanager
def quiet_torchao() -> Iterator[None]:
    """torchao's pytree log line and its pattern tracing's deprecation warnings about export internals."""
    with quiet_logger("torch.utils._pytree"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


@contextlib.contextmanager
def quiet_compiler_probe(active: bool) -> Iterator[None]:
    """Inductor's first C++ build logs "No CUDA runtime is found" on CPU-only machines: true, irrelevant to a CPU
    runtime, alarming in ``vggnet predict`` output. Meant for the first call (the compile) only."""
    with quiet_logger("torch.utils.cpp_extension", active):
        yield


@contextlib.contextmanager
def quiet_lowering() -> Iterator[None]:
    """Inductor's int8 lowering trips torch's own "To copy construct from a tensor" warning on every compile."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
        yield
