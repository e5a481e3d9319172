"""What ``mpt-export serve`` is told, as one typed object from the command line to where each value is used (the
socket, the session, the scheduler, the routes, each Ray replica): one name per concept, checked once here."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ...errors import OptionError
from ...runtime.options import SessionOptions
from .access import FORMATS
from .hosts import allow_list, check_allowed
from .protocol import DEFAULT_MAX_BODY, api_key_of


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"  # 127.0.0.1: this machine only
    port: int = 8000  # 0: a free one, printed at start
    max_batch: int = 16  # rows decoded together at most (lowered to a backend's own limit)
    max_queue: int = 256  # requests waiting at most; beyond it 429
    api_key: str | None = None  # None: no key; never empty (see protocol.api_key_of)
    threads: int | None = None  # ONNX Runtime intra-op threads (None: one per core)
    provider: str = "cpu"  # ONNX Runtime provider
    drain_timeout: float = 30.0  # seconds to finish the requests in flight on SIGTERM/SIGINT
    max_body_bytes: int = DEFAULT_MAX_BODY  # largest request body (413 beyond)
    prepack: bool | str = "auto"  # ONNX Runtime weight prepacking: True, False or "auto" (None means "auto")
    graph: str = "auto"  # causal bundles: the fused graph ("fast"), the traced one ("plain"), or "auto"
    allowed_hosts: tuple[str, ...] = ()  # Host names allowed besides loopback and host ("*": any; see hosts.py)
    header_timeout: float = 30.0  # seconds a client has to send a request's headers
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    limit_concurrency: int | None = None  # connections + requests at once at most (503 beyond); None: no limit
    task_dirs: tuple[str, ...] = ()  # directories POST /admin/tasks may load adapters from (none: the route is off)
    kv_cache_mib: float = SessionOptions.kv_cache_mib  # memory for tasks' prompt keys/values kept (MiB)
    access_log: bool = True  # a line per request on stderr (see access.py)
    log_format: str = "text"  # the access line: "text" or "json"
    task_aliases: tuple[tuple[str, str], ...] = ()  # (alias, task): requests for the alias run the task
    default_task: str | None = None  # what a request without a model runs (None: it must name one)

    def __post_init__(self):
        if self.log_format not in FORMATS:
            raise OptionError(f"unknown --log-format {self.log_format!r}; choose one of {', '.join(FORMATS)}",
                              param="log_format")
        if not 0 <= self.port <= 65535:
            raise OptionError(f"--port must be in [0, 65535], got {self.port}", param="port")
        if self.max_batch < 1 or self.max_queue < 1 or self.max_body_bytes < 1:
            raise OptionError("--max-batch, --max-queue and --max-body-bytes must be >= 1",
                              param=next(k for k in ("max_batch", "max_queue", "max_body_bytes") if getattr(self, k) < 1))
        if self.drain_timeout < 0:
            raise OptionError(f"--drain-timeout must be >= 0, got {self.drain_timeout}", param="drain_timeout")
        for name in ("header_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise OptionError(f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(self, name)}",
                                  param=name)
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise OptionError(f"--limit-concurrency must be >= 1, got {self.limit_concurrency}",
                              param="limit_concurrency")
        object.__setattr__(self, "allowed_hosts", check_allowed(tuple(self.allowed_hosts or ())))
        object.__setattr__(self, "task_dirs", tuple(str(d) for d in self.task_dirs or ()))
        for d in self.task_dirs:
            if not os.path.isdir(d):
                raise OptionError(f"--task-dir {d} is not a directory; name the directory adapters may be loaded "
                                  "from", param="task_dirs")
        aliases = tuple(_alias(a) for a in self.task_aliases or ())
        names = [a for a, _ in aliases]
        if len(set(names)) < len(names):
            raise OptionError(f"--task-alias names {next(a for a in names if names.count(a) > 1)!r} twice; an alias "
                              "stands for one task", param="task_aliases")
        object.__setattr__(self, "task_aliases", aliases)
        object.__setattr__(self, "api_key", api_key_of(self.api_key, where="--api-key"))
        if self.prepack is None:
            object.__setattr__(self, "prepack", "auto")
        try:
            self.session_options  # noqa: B018 - threads, prepack and the cache's memory checked here, before anything loads
        except OptionError as e:
            raise OptionError(str(e).replace("kv_cache_mib", "--kv-cache-mib"), param=e.param) from None

    def check_aliases(self, tasks) -> None:
        """Each alias names a task of the bundle (``tasks``: its names, a container) and is not one itself; the
        default task is a task or an alias."""
        if self.default_task is not None and self.default_task not in tasks and \
                self.default_task not in dict(self.task_aliases):
            raise OptionError(f"--default-task {self.default_task}: the bundle has no task {self.default_task!r} "
                              "(see `mpt-export tasks list BUNDLE`)", param="default_task")
        for alias, task in self.task_aliases:
            if alias in tasks:
                raise OptionError(f"--task-alias {alias}={task}: {alias!r} is a task of the bundle already; choose "
                                  "another alias", param="task_aliases")
            if task not in tasks:
                raise OptionError(f"--task-alias {alias}={task}: the bundle has no task {task!r} (see `mpt-export "
                                  "tasks list BUNDLE`)", param="task_aliases")

    @property
    def session_options(self) -> SessionOptions:
        """How the served session opens (the scheduler edits its decode state through the session, wherever the
        backend keeps it)."""
        return SessionOptions(provider=self.provider, intra_op_threads=self.threads, prepack=self.prepack,
                              graph=self.graph, kv_cache_mib=self.kv_cache_mib)

    @property
    def host_allow_list(self) -> frozenset[str] | None:
        """The names a request's ``Host`` may carry (None: any)."""
        return allow_list(self.host, self.allowed_hosts)

    def with_(self, **changes) -> "ServeOptions":
        return replace(self, **changes)


def _alias(spec) -> tuple[str, str]:
    """``ALIAS=TASK`` (or a pair) -> (alias, task), both non-empty."""
    alias, sep, task = spec.partition("=") if isinstance(spec, str) else (spec[0], "=", spec[1])
    alias, task = alias.strip(), task.strip()
    if not sep or not alias or not task:
        raise OptionError(f"--task-alias takes ALIAS=TASK (e.g. sentiment=sst2), got {spec!r}", param="task_aliases")
    return alias, task
