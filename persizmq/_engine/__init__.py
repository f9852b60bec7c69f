"""The disk engine behind :class:`persizmq.PersistentStorage`, one module per concept.

* ``_format``: files, names, segment headers, records, offsets (the on-disk format 3);
* ``_segment``: creating, mapping and growing segment files; the quarantine;
* ``_position``: the consumer position and the producer's offset reservation;
* ``_durability``: fsync rounds, completed-fsync watermarks, fail-stop, the background thread;
* ``_writer``: the producer role (appends, roll-over, recovery on open);
* ``_cursor``: walking the records across segments and past damage;
* ``_ledger``: counting what the segments hold in O(1);
* ``_consumer``: the consumer role and the read-only reader;
* ``_legacy`` and ``_v2_position``: what persizmq 1.0.x and 2.0.0 left behind;
* ``_queue``: the open queue of a directory (bounds, waits) that handles share;
* ``_try_lock``: a non-blocking acquire that an interrupt cannot leak;
* ``_registry``: one open queue per directory per process, and the exit hook.
"""

__all__: "list[str]" = []
