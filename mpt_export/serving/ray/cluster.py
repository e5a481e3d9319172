"""The driver's Ray: a local instance it starts (and stops), or a cluster it joins.

**Private control plane.** A local Ray instance started here gets a node address of 127.0.0.1 (so its GCS,
raylet, workers and agents listen on loopback) and Ray's token authentication with a fresh token made for this run
(``RAY_AUTH_MODE=token``, the token in a 0600 file in a 0700 directory this process owns, handed to Ray by
``RAY_AUTH_TOKEN_PATH``, never printed, removed at exit). Ray's metrics exporter is turned off (each replica has
``/metrics``). With ``--ray-address`` the cluster is the user's: it must run with token authentication itself.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
from pathlib import Path

_PRIVATE_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


def private_ray_env(workdir: Path) -> dict[str, str | None]:
    """The environment a local Ray instance started by this process inherits: token authentication with a fresh
    token (a 0600 file in ``workdir``), and a loopback node address (Ray's own switch for single-machine instances:
    its processes then listen on 127.0.0.1). -> the previous values, for :func:`restore_env`."""
    before = {k: os.environ.get(k) for k in _PRIVATE_ENV}
    token = workdir / "ray_auth_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the file
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # node address 127.0.0.1 (Ray: "single machine only")
    if "ray" in sys.modules:  # Ray read its config already (a library caller): make it read the new mode
        try:
            from ray._raylet import Config

            Config.initialize("")
        except Exception:
            pass
    return before


def restore_env(before: dict[str, str | None]) -> None:
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def start_ray(ray, address: str | None, num_cpus: int, say) -> bool:
    """Join the cluster at ``address``, or start a local Ray instance. -> whether this process started Ray."""
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's INFO lines about its own start
    if address:
        say(f"joining the Ray cluster at {address}")
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            say("warning: this Ray cluster runs without token authentication — anyone who can reach its ports "
                "can run code on it; start it with RAY_AUTH_MODE=token and keep its ports off public networks")
        return False
    say("starting a local Ray instance (stops with this command; loopback only, token authentication)")
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR", num_cpus=num_cpus,
             _system_config={"enable_metrics_collection": False})
    return True


def leave_ray(ray, serve, started_ray: bool, env_before: dict[str, str | None] | None, workdir: Path) -> None:
    """Shut down Serve and the Ray instance this process started, or disconnect from a joined cluster; then restore
    the environment and remove the token's directory."""
    try:
        if started_ray:  # the instance and every actor in it stop here (the app was deleted, its replicas drained);
            ray.shutdown()  # serve.shutdown() first would kill its controller mid-task: a red line from the raylet
        elif "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()  # a joined cluster keeps running; only this driver disconnects
    finally:
        if env_before is not None:
            restore_env(env_before)
        shutil.rmtree(workdir, ignore_errors=True)
