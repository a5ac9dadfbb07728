"""The facegallery server, one sub-package per layer (each imports only those listed before it):

* :mod:`facegallery.server.contract` - what server and export share: errors, ``Face``, the model manifest.
* :mod:`facegallery.server.face` - the face pipeline: decode -> detect -> landmarks -> align -> embed.
* :mod:`facegallery.server.gallery` - the gallery engine: store, index, search, decisions.
* :mod:`facegallery.server.service` - the gRPC service; the only package that imports grpc.
"""
