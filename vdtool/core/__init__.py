"""The image-stack core: errors, files, the backend contract, the stack, ops."""
