"""The gallery engine: the store (the truth), the vector index (search), and the decisions.

Knows embeddings and identities; takes faces through the ``FaceAnalyzer`` protocol and knows
nothing of gRPC or images. Imports only ``facegallery.server.contract``.
"""
