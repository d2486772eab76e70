"""The teacher store: a Zarr v3 group of teacher logits, features and heads over seeded views.

writer.py fills it (`camkd cache-teachers`), reader.py serves it to distillation,
info.py and verify.py inspect it. layout.py is the one place that names its arrays.
"""

from camkd.store.reader import Expect, TeacherStore, open_store

__all__ = ["Expect", "TeacherStore", "open_store"]
