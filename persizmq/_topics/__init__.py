"""The topic store: the newest message per topic, in a compacted log (``PersistentTopicStorage``).

Modules: ``_format`` (files and records), ``_files`` (creating and recovering files), ``_core``
(the open store: index, writes, reads, fsyncs), ``_compact`` (compaction), ``_storage`` (the
public class and the sharing of one store per directory within a process).
"""

from persizmq._topics._storage import PersistentTopicStorage, TopicStorageStats

__all__ = ["PersistentTopicStorage", "TopicStorageStats"]
