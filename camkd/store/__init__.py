"""The teacher store: a Zarr v3 group of teacher logits, features and heads over seeded views.

The floor of camkd: it imports nothing above it (no models, methods, teachers or evaluation).
writer.py fills it (`camkd cache-teachers`) from teachers handed in by camkd.cache (runner.py),
with config.py, identity.py, space.py, schema.py, pipeline.py and summary.py; reader.py serves it
to distillation; info.py, verify.py and stage.py read it without loading the writer (sizes.py:
the read side's size helpers). layout.py is the one place that names its arrays; description.py the one
that reads and writes its attrs (a typed StoreDescription). The modules import one another directly
(``import camkd.store.layout as layout``), never through this package, which re-exports the reader's API:
tests/test_store_imports.py holds the table of which may import which.
"""

from camkd.store.reader import Expect, TeacherStore, open_store

__all__ = ["Expect", "TeacherStore", "open_store"]
