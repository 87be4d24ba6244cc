"""Service entrypoints: Flower (``taskstack-flower``) and the local stack (``taskstack-local``)."""
