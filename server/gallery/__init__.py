"""The gallery engine: the store (the truth), the vector index (search), and the decisions.

``manager.py`` (``GalleryManager``, the facade the service calls) routes each call to one
``indexed_gallery.py`` ``IndexedGallery`` (a gallery's index, lock and snapshots) over
``store.py`` (SQLite), ``index.py`` (FAISS, identity search) and ``snapshot.py`` (snapshot files).
Knows embeddings and identities; takes faces through the ``FaceAnalyzer`` protocol and knows
nothing of gRPC or images. Imports only ``facegallery.server.contract``.
"""
