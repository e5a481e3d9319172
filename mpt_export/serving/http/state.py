"""What the routes share: the bundle, its session and scheduler, readiness, reload and the Prometheus metrics."""

from __future__ import annotations

import threading
from pathlib import Path

from ...errors import MptExportError
from ...scheduler.batching import Scheduler
from ...scheduler.request import Request
from .options import ServeOptions
from .errors import APIError
from ...bundle.reader import load_bundle
from .chat import ChatTemplate


class ServerState:
    """The bundle, its session and scheduler, readiness, metrics — shared by the routes."""

    def __init__(self, bundle_path: str | Path, options: ServeOptions | None = None, opened=None):
        """``opened``: the bundle at ``bundle_path`` already opened (``load_bundle(..., verify=False)``, as the server
        does before it listens): :meth:`load` verifies and serves that one object instead of opening the path
        again."""
        self.bundle_path = Path(bundle_path)
        self._opened = opened
        self.options = options = options or ServeOptions()
        self.aliases = dict(options.task_aliases)  # alias -> task (serve --task-alias)
        self.status = "loading"
        self.error: str | None = None
        self.bundle = self.session = self.scheduler = self.chat = None
        self._reload_lock = threading.Lock()
        self._metrics()

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Verify the bundle (the one opened before, else the path's, opened and verified once) and start the
        scheduler (runs in a worker thread while /health answers 503); a failure — a file that does not match its
        sha256 included — is reported by /health and the server's log line."""
        opened, self._opened = self._opened, None
        try:
            self.load_from(opened.verify() if opened is not None else load_bundle(self.bundle_path))
        except Exception as e:
            if opened is not None and self.bundle is not opened:
                opened.close()
            if self.status != "failed":  # load_from sets it for its own failures
                self.status, self.error = "failed", str(e) if isinstance(e, MptExportError) else repr(e)

    def drain(self, timeout: float) -> bool:
        self.status = "draining"
        return self.scheduler.drain(timeout) if self.scheduler else True

    def close(self) -> None:
        if self.scheduler:
            self.scheduler.stop()
        if self.bundle:
            self.bundle.close()
        if self._opened is not None:  # never loaded
            self._opened.close()

    def reload(self, bundle=None) -> dict:
        """Re-read the bundle from disk (or take ``bundle``, an opened :class:`~mpt_export.bundle.reader.Bundle`: Ray
        replicas pass the one their service pins): new and removed tasks take effect between two scheduler steps;
        requests in flight keep running. Refused (409) when anything but the task bank changed."""
        with self._reload_lock:
            new = load_bundle(self.bundle_path) if bundle is None else bundle
            changed = self.bundle.info.changed_beyond_tasks(new.info)
            if changed:
                new.close()
                raise APIError(409, f"the bundle's graphs or tokenizer changed on disk ({', '.join(changed[:4])}); "
                               "a reload only takes new task vectors — restart the server to serve it",
                               code="restart_required")
            before = set(self.session.tasks)
            self.session.replace_bank(new.task_bank())
            old, self.bundle = self.bundle, new
            self.session.bundle = new
            old.close()
            after = self.session.tasks
            return {"tasks": after, "added": [t for t in after if t not in before],
                    "removed": sorted(before - set(after)), "digest": self.digest}

    def load_from(self, bundle) -> None:
        """Serve an opened ``bundle`` (:meth:`load`; Ray replicas: the bundle their service pins, whose task bank
        may differ from the one on disk): its session, tokenizer, chat template and scheduler. Raises on failure."""
        o = self.options
        try:
            self.bundle = bundle
            self.session = bundle.session(o.session_options)
            self.session.tokenizer  # noqa: B018 - fail now, not on the first request
            self.chat = ChatTemplate.from_bundle(bundle)
            self.scheduler = Scheduler(self.session, o.max_batch, o.max_queue).start()
            self.status = "ready"
        except Exception as e:
            self.status, self.error = "failed", str(e) if isinstance(e, MptExportError) else repr(e)
            raise

    @property
    def digest(self) -> str | None:
        """The served bundle's identity: its manifest's own sha256 (it covers every file's sha256)."""
        return self.bundle.info.digest if self.bundle is not None else None

    # -- metrics -----------------------------------------------------------------------------------------------
    def _metrics(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.m_requests = Counter("mpt_export_requests", "HTTP requests by task and status", ["task", "status"],
                                  registry=r)
        self.m_tokens = Counter("mpt_export_generated_tokens", "tokens generated", registry=r)
        Gauge("mpt_export_queue_depth", "requests waiting", registry=r).set_function(
            lambda: self.scheduler.queue_depth if self.scheduler else 0)
        Gauge("mpt_export_running_batch_size", "rows in the running batch", registry=r).set_function(
            lambda: self.scheduler.running if self.scheduler else 0)
        r.register(CacheCollector(self))
        self.m_ttft = Histogram("mpt_export_time_to_first_token_seconds", "from submission to the first token",
                                registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.m_tpot = Histogram("mpt_export_time_per_output_token_seconds", "mean time per token after the first",
                                registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))

    def observe(self, req: Request) -> None:
        self.m_tokens.inc(len(req.tokens))
        if req.t_first is not None:
            self.m_ttft.observe(req.t_first - req.t_submit)
            if len(req.tokens) > 1 and req.t_done is not None:
                self.m_tpot.observe((req.t_done - req.t_first) / (len(req.tokens) - 1))

    def count(self, task: str | None, status: int) -> None:
        known = self.session is not None and task in self.session.bank
        self.m_requests.labels(task if known else "-", str(status)).inc()


class CacheCollector:
    """``/metrics``' view of the session's caches: ``mpt_export_cache_{hits,misses,evictions}_total`` and
    ``mpt_export_cache_entries`` per cache (``prompt_kv``: the per-task prompt keys/values a request starts from; a
    miss costs one prefill of the task's virtual tokens; ``prompt``: composed prompts)."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        session = self.state.session
        stats = session.cache_stats() if session is not None else {}
        families = {k: CounterMetricFamily(f"mpt_export_cache_{k}", f"cache {k}", labels=["cache"])
                    for k in ("hits", "misses", "evictions")}
        gauges = {k: GaugeMetricFamily(f"mpt_export_cache_{k}", what, labels=["cache"]) for k, what in (
            ("entries", "entries held"), ("size", "the most entries the cache holds (absent: no count limit)"),
            ("bytes", "bytes held"), ("max_bytes", "the most bytes the cache holds (absent: no byte limit)"))}
        for name, st in stats.items():
            for k, fam in families.items():
                fam.add_metric([name], st[k])
            for k, fam in gauges.items():
                if st.get(k) is not None:
                    fam.add_metric([name], st[k])
        yield from (*families.values(), *gauges.values())
