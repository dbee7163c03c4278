"""Adapters that plug triflash into other libraries (``transformers``)."""
