"""The Redis/Valkey Streams backend (SPEC section 10): imported only when it is asked for.

``import persizmq`` does not import this package; ``persizmq.RedisStreamStorage`` does, on
first use, and that is when redis-py must be installed (the extra ``persizmq[redis]``).
"""

try:
    import redis  # noqa: F401 (the dependency this backend needs; imported to check for it)
except ImportError as _err:
    from persizmq._errors import MissingDependencyError

    raise MissingDependencyError(
        "persizmq.RedisStreamStorage needs redis-py, which is not installed: "
        "pip install 'persizmq[redis]' (or pip install redis)"
    ) from _err

from persizmq._redis._storage import OVERFLOW_POLICIES, RedisStreamStats, RedisStreamStorage

__all__ = ["OVERFLOW_POLICIES", "RedisStreamStats", "RedisStreamStorage"]
