"""Third-party chatter kept off the user's terminal while we run torch, transformers, PEFT and the ONNX exporter:
progress bars (transformers' "Loading weights"), exporter warnings ("torchvision is not installed. Skipping
torchvision::nms"), deprecation warnings from inside the libraries. ``third_party_quiet()`` silences them for one
call and puts every setting back afterwards (a library must not change its caller's warnings or logging);
``silence_third_party()`` is the same for a whole process (the CLI)."""

from __future__ import annotations

import functools
import logging
import os
import warnings
from contextlib import contextmanager

LOGGERS = ("torch", "torch.onnx", "torch.onnx._internal.exporter._registration", "torch._dynamo", "torch.export",
           "onnxscript", "onnx_ir", "transformers", "peft", "accelerate")


def _import_torch() -> None:
    """torch sets its loggers' levels when it is imported: import it first so that ours stay."""
    try:
        import torch  # noqa: F401
    except ImportError:
        pass


def _transformers_logging():
    try:
        from transformers.utils import logging as tlog
    except ImportError:
        return None
    return tlog


def silence_third_party() -> None:
    """For the rest of the process (the command line's commands)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    _import_torch()
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    tlog = _transformers_logging()
    if tlog is not None:
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()


@contextmanager
def third_party_quiet():
    """For one library call: warnings, the libraries' loggers and transformers' progress bars restored after it."""
    _import_torch()
    tlog = _transformers_logging()
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    verbosity = tlog.get_verbosity() if tlog is not None else None
    bars = tlog.is_progress_bar_enabled() if tlog is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        if tlog is not None:
            tlog.set_verbosity_error()
            tlog.disable_progress_bar()
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            if tlog is not None:
                tlog.set_verbosity(verbosity)
                if bars:
                    tlog.enable_progress_bar()


def quietly(fn):
    """``fn`` run under :func:`third_party_quiet`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with third_party_quiet():
            return fn(*args, **kwargs)

    return wrapper
