"""The topic store: the newest message per topic, in a compacted log (``PersistentTopicStorage``).

Modules: ``_format`` (files and records), ``_files`` (creating and recovering files), ``_core``
(the open store: the index by seq, the files' tables, writes, reads, when to compact),
``_room`` (the active file's mapping and reserved room), ``_durability`` (fsyncs, fail-stop),
``_compact`` (compaction) and ``_copier`` (its copying, in a helper process), ``_encode``
(message -> topic, record kind, body), ``_storage`` (the public class and the sharing of one
store per directory within a process).
"""

from persizmq._topics._storage import PersistentTopicStorage, TopicStorageStats

__all__ = ["PersistentTopicStorage", "TopicStorageStats"]
