"""The Ray Serve deployment's names and options, and Ray itself (imported on first use only).

- **Load and queueing.** A replica takes ``max_batch + max_queue`` requests into its scheduler (one batch running, a
  bounded queue waiting); Serve lets a replica hold more than that (``max_ongoing_requests`` adds headroom), so past
  the scheduler's capacity the replica itself answers an OpenAI-shaped 429 (``queue_full``) at once instead of Serve's
  router shedding with its plain-text 503. The router's queue is left unbounded: a request waits there only while
  every replica holds ``max_ongoing_requests``, which the quick 429s keep short. Autoscaling targets one full batch
  per replica (``target_ongoing_requests = max_batch``).
"""

from __future__ import annotations

from ...errors import InputError, MissingDependencyError

APP_NAME = "mpt-export"
REPLICA_HEADER = "X-Mpt-Export-Replica"


def import_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise MissingDependencyError("--ray needs Ray Serve: pip install 'mpt-export[ray]'") from None
    return ray, serve


def parse_autoscale(text: str | None) -> tuple[int, int] | None:
    """``MIN:MAX`` -> (min, max) replicas; one clear error otherwise."""
    if text is None:
        return None
    lo, sep, hi = str(text).partition(":")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise InputError(f"--autoscale takes MIN:MAX replicas (e.g. 1:4), got {text!r}")
    lo, hi = int(lo), int(hi)
    if hi < 1 or lo > hi:
        raise InputError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return lo, hi


def headroom(max_batch: int) -> int:
    """Requests a replica holds beyond its scheduler's capacity: the ones it answers without a scheduler row (its own
    429s, /health, /v1/models, /metrics, /admin) and those being read or tokenized."""
    return max(16, max_batch)


def deployment_options(replicas: int | None, autoscale: tuple[int, int] | None, max_batch: int, max_queue: int,
                       cpus: float, gpus: float, drain_timeout: float) -> dict:
    """The Serve deployment's options (see the module docstring for why each value)."""
    if replicas is not None and autoscale is not None:
        raise InputError("give either --replicas N or --autoscale MIN:MAX, not both")
    opts = {
        # more than the scheduler holds, so the scheduler's own 429 answers before Serve's router sheds (plain 503)
        "max_ongoing_requests": max_batch + max_queue + headroom(max_batch),
        "max_queued_requests": -1,  # Serve's router queue: only used while every replica is full, which 429s keep short
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_wait_loop_s": 0.5,
        "graceful_shutdown_timeout_s": max(1.0, drain_timeout),
    }
    if autoscale is not None:
        lo, hi = autoscale
        opts["autoscaling_config"] = {"min_replicas": lo, "initial_replicas": max(lo, 1), "max_replicas": hi,
                                      "target_ongoing_requests": max_batch}
    else:
        n = 1 if replicas is None else int(replicas)
        if n < 1:
            raise InputError(f"--replicas must be >= 1, got {replicas}")
        opts["num_replicas"] = n
    return opts
