"""A local Ray cluster for the Ray tests (tests/test_ray_dump.py, tests/test_ray_vllm.py)."""

from __future__ import annotations

import time


def start_local_ray():
    """ray.init of a 2-CPU local cluster; its context (address in `.address_info["gcs_address"]`).

    On a 2-core machine at a load average above ~15 Ray's raylet can abort at start (its dashboard agent,
    a Python process, misses the raylet's wait; Ray then raises a bare Exception): one more try. A failed
    start's processes end with this process (Ray's fate sharing)."""
    import ray

    for attempt in (1, 2):
        try:
            return ray.init(num_cpus=2, include_dashboard=False, namespace="gedistill-tests", logging_level="WARNING")
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(10)
    raise AssertionError("unreachable")
