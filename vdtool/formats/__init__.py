"""One module per image format; see vdtool.core.registry for the list."""
