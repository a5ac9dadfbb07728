"""What the server and ``facegallery.export`` share: the exception tree, ``Face``, the model manifest and
chip spec, and durable file writes. Imports nothing else of facegallery."""
