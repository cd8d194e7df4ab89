"""geb: build and run lightweight bilingual (Chinese/English) language models the GEB-1.3B way."""

__version__ = "0.1.0"
