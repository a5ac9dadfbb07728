"""What the server and ``facegallery.export`` share: the exception tree (``errors``), ``Face`` and
``ImageKind`` (``face``), the model manifest and chip spec (``manifest``), durable file writes
(``files``), the image file suffixes the decoder reads (``images``) and default locations
(``paths``). Imports nothing else of facegallery."""
